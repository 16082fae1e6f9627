"""Typed models fed with JSON recorded from the real barman 3.19.1 (tests/fixtures/barman/)."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from barman_dr.exceptions import BarmanOutputError, ValidationError
from barman_dr.hooks.remote import parse_json_output
from barman_dr.models import (
    BackupInfo,
    BackupSummary,
    CheckReport,
    ControlData,
    Lsn,
    RecoveryTarget,
    WalSegment,
    is_wal_segment_name,
    parse_list_backups,
    server_section,
)

BARMAN = Path(__file__).resolve().parents[1] / "fixtures" / "barman"
SERVER = "pg-primary"


def load(name: str):
    return json.loads((BARMAN / name).read_text())


@pytest.fixture(scope="module")
def recording() -> dict:
    return load("recording.json")


# ----------------------------------------------------------------- list-backups


def test_parse_list_backups_recorded(recording):
    backups = parse_list_backups(load("list-backups.json"), SERVER)
    assert len(backups) == recording["done_backups"] == 2
    assert all(isinstance(b, BackupSummary) for b in backups)
    assert {b.backup_id for b in backups} == {"20261125T133925", "20261125T133924"}
    newest = max(backups, key=lambda b: b.backup_id)
    assert newest.backup_id == recording["newest_backup_id"]
    assert newest.is_done and newest.status == "DONE"
    assert newest.backup_type == "full"
    assert newest.size_bytes == 47500207
    assert newest.wal_size_bytes == 33554432
    assert newest.retention_status == "-"
    assert newest.backup_name is None
    # end_time_timestamp (epoch string) becomes an aware UTC datetime
    assert newest.end_time == datetime(2026, 11, 25, 13, 39, 25, tzinfo=UTC)
    assert newest.end_time.tzinfo is not None


def test_parse_list_backups_empty_server():
    assert parse_list_backups({SERVER: []}, SERVER) == []


def test_parse_list_backups_unknown_server():
    with pytest.raises(BarmanOutputError, match="no section for server 'other'"):
        parse_list_backups(load("list-backups.json"), "other")


@pytest.mark.parametrize("payload", [[], "text", None, {SERVER: {"backup_id": "x"}}, {SERVER: "x"}])
def test_parse_list_backups_wrong_shape(payload):
    with pytest.raises(BarmanOutputError):
        parse_list_backups(payload, SERVER)


def test_backup_summary_missing_required_field():
    row = dict(load("list-backups.json")[SERVER][0])
    del row["status"]
    with pytest.raises(BarmanOutputError, match="'status' missing"):
        BackupSummary.from_json(row)


def test_backup_summary_bad_timestamp():
    row = dict(load("list-backups.json")[SERVER][0], end_time_timestamp="yesterday")
    with pytest.raises(BarmanOutputError, match="epoch"):
        BackupSummary.from_json(row)


def test_backup_summary_none_values():
    s = BackupSummary.from_json({"backup_id": "20261125T000000", "status": "FAILED", "end_time_timestamp": None,
                                 "size_bytes": None, "wal_size_bytes": "None"})
    assert not s.is_done
    assert s.end_time is None and s.size_bytes is None and s.wal_size_bytes is None


# ------------------------------------------------------------------ show-backup


def test_backup_info_recorded(recording):
    info = BackupInfo.from_json(load("show-backup.json"), SERVER)
    assert info.server == SERVER
    assert info.backup_id == recording["newest_backup_id"]
    assert info.status == "DONE"
    assert info.timeline == 1
    assert info.begin_wal == "000000010000000000000008"
    assert info.end_wal == "000000010000000000000008"
    assert info.begin_lsn == Lsn.parse("0/8000028")
    assert info.end_lsn == Lsn.parse("0/9000000")
    # the ISO time keeps the fraction the epoch field drops
    assert info.begin_time == datetime(2026, 11, 25, 13, 39, 25, 171729, tzinfo=UTC)
    assert info.end_time == datetime(2026, 11, 25, 13, 39, 25, 499978, tzinfo=UTC)
    assert info.begin_time < info.end_time
    assert info.size_bytes == 30722991
    assert info.wal_files == 2
    assert info.last_available_wal == "00000001000000000000000A"
    assert info.copy_time_seconds == pytest.approx(0.317218)
    assert info.system_id == "7712103150015164788"
    assert info.postgres_version == str(recording["postgresql_version"])
    assert info.backup_method == "postgres"
    assert info.pgdata and info.pgdata.endswith("/pg/pg-primary/data")
    assert info.raw["backup_id"] == info.backup_id


def test_backup_info_to_dict_is_json_serialisable():
    info = BackupInfo.from_json(load("show-backup.json"), SERVER)
    d = info.to_dict()
    assert "raw" not in d
    assert d["begin_lsn"] == "0/8000028" and d["end_lsn"] == "0/9000000"
    assert d["begin_time"] == "2026-11-25T13:39:25.171729+00:00"
    json.dumps(d)  # travels by XCom


def test_backup_info_falls_back_to_epoch_times():
    payload = load("show-backup.json")
    base = payload[SERVER]["base_backup_information"]
    base["begin_time"] = "None"
    base["end_time"] = "not a time"
    info = BackupInfo.from_json(payload, SERVER)
    assert info.begin_time == datetime.fromtimestamp(1795613965, tz=UTC)
    assert info.end_time == datetime.fromtimestamp(1795613965, tz=UTC)


def test_backup_info_without_lsns_and_wal_information():
    payload = load("show-backup.json")
    base = payload[SERVER]["base_backup_information"]
    base["begin_lsn"] = None
    base["end_lsn"] = None
    del payload[SERVER]["wal_information"]
    info = BackupInfo.from_json(payload, SERVER)
    assert info.begin_lsn is None and info.end_lsn is None
    assert info.wal_files is None and info.last_available_wal is None


@pytest.mark.parametrize("drop", ["base_backup_information", "backup_id", "status"])
def test_backup_info_missing_field(drop):
    payload = load("show-backup.json")
    del payload[SERVER][drop]
    with pytest.raises(BarmanOutputError, match=repr(drop)):
        BackupInfo.from_json(payload, SERVER)


def test_backup_info_missing_timeline():
    payload = load("show-backup.json")
    del payload[SERVER]["base_backup_information"]["timeline"]
    with pytest.raises(BarmanOutputError, match="timeline"):
        BackupInfo.from_json(payload, SERVER)


def test_backup_info_wrong_server():
    with pytest.raises(BarmanOutputError, match="show-backup"):
        BackupInfo.from_json(load("show-backup.json"), "pg-other")


# ------------------------------------------------------------------------ check


def test_check_report_ok():
    report = CheckReport.from_json(load("check-ok.json"), SERVER)
    assert report.ok
    assert report.failed == []
    names = {c.name for c in report.checks}
    assert {"receive_wal_running", "replication_slot", "wal_level", "minimum_redundancy_requirements",
            "postgresql_streaming", "systemid_coherence"} <= names
    assert len(report.checks) == 22
    by_name = {c.name: c for c in report.checks}
    assert by_name["wal_level"].hint is None  # "" becomes None
    assert by_name["minimum_redundancy_requirements"].hint == "have 2 non-incremental backups, expected at least 2"
    d = report.to_dict()
    assert d["ok"] is True and d["server"] == SERVER and d["checks"]["wal_level"] == {"ok": True, "hint": None}
    json.dumps(d)


def test_check_report_failed(recording):
    report = CheckReport.from_json(load("check-failed.json"), SERVER)
    assert not report.ok
    assert sorted(c.name for c in report.failed) == recording["failed_checks"]
    slot = next(c for c in report.failed if c.name == "replication_slot")
    assert "receive-wal" in slot.hint
    assert [c.name for c in report.failed_except({"receive_wal_running"})] == ["replication_slot"]
    assert report.failed_except({"receive_wal_running", "replication_slot"}) == []


@pytest.mark.parametrize("payload", [
    {SERVER: {"wal_level": {"hint": ""}}},
    {SERVER: {"wal_level": "OK"}},
    {SERVER: ["wal_level"]},
    {"other": {}},
    [],
])
def test_check_report_malformed(payload):
    with pytest.raises(BarmanOutputError):
        CheckReport.from_json(payload, SERVER)


# ------------------------------------------------------------ malformed output


@pytest.mark.parametrize("text", ["", "   \n", "not json at all", "{\"pg-primary\": [", "ERROR: barman died"])
def test_parse_json_output_rejects_garbage(text):
    with pytest.raises(BarmanOutputError):
        parse_json_output(text, "barman list-backups")


def test_parse_json_output_tolerates_leading_log_lines():
    text = "2026-11-25 13:39:25 WARNING something\n" + (BARMAN / "list-backups.json").read_text()
    payload = parse_json_output(text, "barman list-backups")
    assert len(parse_list_backups(payload, SERVER)) == 2


def test_truncated_recorded_json_is_an_error():
    text = (BARMAN / "show-backup.json").read_text()[:-40]
    with pytest.raises(BarmanOutputError, match="not JSON"):
        parse_json_output(text, "barman show-backup")


@pytest.mark.parametrize("name", ["list-processes.json", "replication-status.json", "show-server.json"])
def test_other_recordings_have_the_server_section(name):
    section = server_section(load(name), SERVER, name)
    assert section


def test_show_server_recording_names_the_wal_catalogue():
    srv = server_section(load("show-server.json"), SERVER, "show-server")
    assert srv["xlogdb_directory"].endswith("/pg-primary/wals")
    assert srv["streaming_archiver"] is True and srv["backup_method"] == "postgres"


# ---------------------------------------------------------------- WAL and LSN


def test_wal_segment_parse_and_name():
    s = WalSegment.parse("00000001000000000000000B")
    assert (s.timeline, s.segno) == (1, 11)
    assert s.name == str(s) == "00000001000000000000000B"
    hi = WalSegment.parse("0000000200000001000000FF")
    assert hi.timeline == 2 and hi.segno == 256 + 255
    # the next segment after ...01000000FF is ...0200000000 (256 segments per xlog id)
    assert WalSegment(2, hi.segno + 1).name == "000000020000000200000000"


@pytest.mark.parametrize("bad", ["", "0000000100000000000000", "00000001000000000000000b", "00000001.history",
                                 "00000001000000000000000B.partial", "G0000001000000000000000B", None])
def test_wal_segment_rejects(bad):
    with pytest.raises(ValueError):
        WalSegment.parse(bad)
    assert not is_wal_segment_name(bad or "")


def test_wal_segment_ordering_and_from_lsn():
    a, b = WalSegment.parse("000000010000000000000008"), WalSegment.parse("00000001000000000000000A")
    assert a < b
    assert WalSegment(1, 9) < WalSegment(2, 0)
    assert WalSegment.from_lsn(1, Lsn.parse("0/8000028")).name == "000000010000000000000008"
    assert WalSegment.from_lsn(2, Lsn.parse("1/FF000000")).name == "0000000200000001000000FF"


@pytest.mark.parametrize(("text", "value"), [
    ("0/8000028", 0x8000028),
    ("0/0", 0),
    ("1/FF000000", (1 << 32) | 0xFF000000),
    ("ABCDEF01/23", (0xABCDEF01 << 32) | 0x23),
    (" 0/5000148 ", 0x5000148),
    ("a/b", (0xA << 32) | 0xB),
])
def test_lsn_parse(text, value):
    lsn = Lsn.parse(text)
    assert lsn.value == value
    assert Lsn.parse(str(lsn)) == lsn
    assert str(lsn) == str(lsn).upper()


@pytest.mark.parametrize("bad", ["", "0", "0/", "/1", "0/5000148/1", "123456789/0", "0x0/1", "0/G", None])
def test_lsn_rejects(bad):
    with pytest.raises(ValueError):
        Lsn.parse(bad)


def test_lsn_ordering():
    assert Lsn.parse("0/5000148") < Lsn.parse("0/8000028") < Lsn.parse("1/0")


# -------------------------------------------------------------- pg_controldata


def test_controldata_recorded():
    cd = ControlData.parse((BARMAN / "pg_controldata-standby.txt").read_text())
    assert cd.state == "in archive recovery"
    assert cd.timeline == 1
    assert cd.checkpoint_lsn == Lsn.parse("0/2000060")
    assert cd.system_id == "7712103150015164788"
    # the standby's system identifier is the one Barman knows for the primary
    assert cd.system_id == load("show-backup.json")[SERVER]["system_id"]
    assert cd.raw["Latest checkpoint's REDO WAL file"] == "000000010000000000000002"
    assert cd.raw["Bytes per WAL segment"] == "16777216"


def test_controldata_missing_fields():
    with pytest.raises(BarmanOutputError, match="lacks"):
        ControlData.parse("pg_control version number: 1300\n")
    with pytest.raises(BarmanOutputError):
        ControlData.parse("")


def test_controldata_without_checkpoint_lsn():
    text = "\n".join(ln for ln in (BARMAN / "pg_controldata-standby.txt").read_text().splitlines()
                     if not ln.startswith("Latest checkpoint location"))
    assert ControlData.parse(text).checkpoint_lsn is None


# ------------------------------------------------------------- recovery target


@pytest.mark.parametrize(("target", "argv"), [
    (RecoveryTarget("time", "2026-11-25T12:59:41+00:00"), ["--target-time", "2026-11-25T12:59:41+00:00"]),
    (RecoveryTarget("xid", "745"), ["--target-xid", "745"]),
    (RecoveryTarget("xid", "745", inclusive=False), ["--target-xid", "745", "--exclusive"]),
    (RecoveryTarget("lsn", "0/5000148", inclusive=False), ["--target-lsn", "0/5000148", "--exclusive"]),
    (RecoveryTarget("name", "before-migration"), ["--target-name", "before-migration"]),
    (RecoveryTarget("immediate", None), ["--target-immediate"]),
    (RecoveryTarget("immediate", None, inclusive=False), ["--target-immediate"]),
])
def test_recovery_target_barman_args(target, argv):
    args = target.barman_args()
    assert args == argv
    assert isinstance(args, list) and all(isinstance(a, str) for a in args)


def test_recovery_target_value_with_spaces_stays_one_argv_element():
    args = RecoveryTarget("time", "2026-11-25 12:59:41+00:00").barman_args()
    assert args == ["--target-time", "2026-11-25 12:59:41+00:00"]


def test_recovery_target_unknown_kind():
    with pytest.raises(ValidationError) as ei:
        RecoveryTarget("timestamp", "x")
    assert ei.value.field == "target"


def test_recovery_target_time_and_describe():
    t = RecoveryTarget("time", "2026-11-25T12:59:41+00:00", inclusive=False)
    assert t.time == datetime(2026, 11, 25, 12, 59, 41, tzinfo=UTC)
    assert "exclusive" in t.describe()
    assert RecoveryTarget("xid", "7").time is None
    assert "immediate" in RecoveryTarget("immediate", None).describe()
    assert t.to_dict() == {"kind": "time", "value": "2026-11-25T12:59:41+00:00", "inclusive": False}


# --------------------------------------------- any recording: shape and self-consistency

RECORDINGS = [BARMAN] + ([Path(p) for p in os.environ["BARMAN_DR_RECORDING"].split(os.pathsep)]
                         if os.environ.get("BARMAN_DR_RECORDING") else [])


@pytest.mark.parametrize("rec_dir", RECORDINGS, ids=[str(p) for p in RECORDINGS])
def test_recording_is_self_consistent(rec_dir):
    """Values-free checks that hold for every recording (BARMAN_DR_RECORDING=/tmp/new-recording to check a new one)."""
    from barman_dr.hooks.barman import compute_coverage

    facts = json.loads((rec_dir / "recording.json").read_text())
    server = facts["server"]

    def j(name):
        return json.loads((rec_dir / name).read_text())

    assert facts["barman_version"].startswith("3.19.")
    backups = parse_list_backups(j("list-backups.json"), server)
    assert sum(b.is_done for b in backups) == facts["done_backups"]
    info = BackupInfo.from_json(j("show-backup.json"), server)
    assert info.backup_id == facts["newest_backup_id"] and info.status == "DONE"
    assert info.begin_lsn <= info.end_lsn and info.begin_time <= info.end_time
    assert str(info.postgres_version) == str(facts["postgresql_version"])
    assert CheckReport.from_json(j("check-ok.json"), server).ok
    failed = CheckReport.from_json(j("check-failed.json"), server)
    assert sorted(c.name for c in failed.failed) == facts["failed_checks"]
    cd = ControlData.parse((rec_dir / "pg_controldata-standby.txt").read_text())
    assert cd.system_id == info.system_id and cd.state == "in archive recovery"
    catalog = [ln.split("\t")[0] for ln in (rec_dir / "xlog-db.txt").read_text().splitlines() if ln.strip()]
    assert facts["switched_wal"] in catalog
    assert compute_coverage(catalog, info.begin_wal, info.last_available_wal).complete
    assert server_section(j("show-server.json"), server, "show-server")["xlogdb_directory"]
