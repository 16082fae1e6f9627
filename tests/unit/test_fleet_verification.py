"""The per-barman-host verification: each server evaluated from batched Barman output (recorded from a real lab).

Fixtures in tests/fixtures/barman/fleet/ are Barman 3.19.1's real output of `check all`,
`list-backups all`, `show-servers all`, `replication-status all` and of the batched files
script (barman_files.FILES_SCRIPT) on a lab with two servers, pg-primary (with a standby)
and pg-primary2; faults are crafted from them.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from barman_dr.barman_files import FILES_SCRIPT, begin_wal_of, files_args, parse_files_output
from barman_dr.exceptions import BarmanCommandError
from barman_dr.fleet_verification import (
    HostSnapshot,
    Probe,
    ServerSpec,
    evaluate_server,
    oldest_done_backup_ids,
    own_sections,
    slot_active,
)
from barman_dr.safety.orphans import parse_listing_many
from barman_dr.verification import CRITICAL, OK, WARNING, build_report

FLEET = Path(__file__).resolve().parents[1] / "fixtures" / "barman" / "fleet"
PRIMARY = ServerSpec("pg-primary", ("pg-standby",), {"max_backup_age_hours": 170})
PRIMARY2 = ServerSpec("pg-primary2", (), {"max_backup_age_hours": 170})
BACKUP_DIR = "/tmp/fleet-lab/barman/home"


def load(name: str):
    return json.loads((FLEET / name).read_text())


def files_text() -> str:
    return (FLEET / "server-files.txt").read_text()


def now_after_backups() -> datetime:
    ends = [int(b["end_time_timestamp"]) for rows in load("list-backups-all.json").values() for b in rows]
    return datetime.fromtimestamp(max(ends), UTC) + timedelta(hours=1)


def snapshot(**over) -> HostSnapshot:
    base = {"check": Probe(value=load("check-all.json")), "backups": Probe(value=load("list-backups-all.json")),
            "servers": Probe(value=load("show-servers-all.json")),
            "replication": Probe(value=load("replication-status-all.json")),
            "files": Probe(value=parse_files_output(files_text())),
            "orphans": Probe(value={"pg-primary": [], "pg-primary2": []}), "backup_directory": BACKUP_DIR}
    base.update(over)
    return HostSnapshot(**base)


def report(spec: ServerSpec, snap: HostSnapshot) -> dict:
    findings, facts = evaluate_server(spec, snap, now_after_backups())
    return build_report(spec.name, findings, facts, checked_at="2026-12-04T18:34:00+00:00")


def by_check(rep: dict) -> dict:
    return {f["check"]: f for f in rep["findings"]}


# ----------------------------------------------------------------------------- healthy fleet


def test_recorded_healthy_host_is_ok_for_each_server_with_every_check():
    snap = snapshot()
    rep = report(PRIMARY, snap)
    assert rep["status"] == OK, rep["reasons"]
    assert {"backup_freshness", "wal_continuity", "wal_archive_lag", "receive_wal", "replication_slot",
            "standby.pg-standby", "disk_usage", "orphans"} <= set(by_check(rep))
    rep2 = report(PRIMARY2, snap)
    assert rep2["status"] == OK, rep2["reasons"]
    assert not any(c.startswith("standby.") for c in by_check(rep2))
    # the report shape and the facts the metrics endpoint and the DR page read are unchanged
    assert set(rep) == {"server", "status", "checked_at", "reasons", "findings", "facts"}
    facts = rep["facts"]
    assert {"thresholds", "barman_check_failed", "done_backups", "newest_backup_end", "oldest_backup_end",
            "newest_wal_time", "wal", "disk_usage_percent", "orphans"} <= set(facts)
    rows = load("list-backups-all.json")["pg-primary"]
    newest = max(int(b["end_time_timestamp"]) for b in rows)
    assert facts["newest_backup_end"] == datetime.fromtimestamp(newest, UTC).isoformat()
    assert facts["done_backups"] == sorted(b["backup_id"] for b in rows)
    # the oldest backup's begin WAL (from its backup.info) is where the continuity proof starts
    assert facts["wal"]["first_wal"] == begin_wal_of(parse_files_output(files_text())[1]["pg-primary"]
                                                     .section("begin_wal"))
    assert facts["wal"]["current_wal"] == load("show-servers-all.json")["pg-primary"]["current_xlog"]
    assert facts["wal"]["coverage"]["complete"] is True
    json.dumps(rep)  # XCom and the audit trail take it as is


def test_oldest_done_backup_ids_and_files_args_name_each_servers_backup_info():
    oldest = oldest_done_backup_ids(load("list-backups-all.json"), ["pg-primary", "pg-primary2", "pg-ghost"])
    assert oldest["pg-primary"] == min(b["backup_id"] for b in load("list-backups-all.json")["pg-primary"])
    assert "pg-ghost" not in oldest
    args = files_args("/b", [("s1", "/x/s1-xlog.db", "/w", "/h/s1", "B1"), ("s2", "", "", "/h/s2", None)])
    assert args == ["/b", "s1", "/x/s1-xlog.db", "/w", "/h/s1/meta/B1-backup.info", "/h/s1/base/B1/backup.info",
                    "s2", "", "", "", ""]
    assert "$1" in FILES_SCRIPT and "eval" not in FILES_SCRIPT


# ------------------------------------------------------------------- shared Barman installation


def test_only_the_entrys_own_servers_are_taken_from_a_shared_installation():
    """`check all` of a Barman shared by two inventory entries returns both entries' servers."""
    payload = load("check-all.json")
    assert set(payload) == {"pg-primary", "pg-primary2"}
    assert set(own_sections(payload, ["pg-primary2"])) == {"pg-primary2"}
    # pg-primary (the other entry's) failing everything does not touch pg-primary2's report
    broken = copy.deepcopy(payload)
    for item in broken["pg-primary"].values():
        item["status"] = "FAILED"
    snap = snapshot(check=Probe(value=own_sections(broken, ["pg-primary2"])))
    assert report(PRIMARY2, snap)["status"] == OK


# ----------------------------------------------------------------------------------- faults


def test_server_missing_from_the_batch_output_is_critical_for_that_server_only():
    ghost = ServerSpec("pg-ghost", (), None)
    snap = snapshot()
    rep = report(ghost, snap)
    assert rep["status"] == CRITICAL
    by = by_check(rep)
    for probe in ("barman_check", "list_backups", "show_server", "wal_catalog", "wal_files"):
        assert by[probe]["status"] == CRITICAL, probe
    assert "no section for server 'pg-ghost'" in by["barman_check"]["reason"]
    assert "pg-ghost" in by["wal_catalog"]["reason"]
    # the others in the same snapshot are unaffected
    assert report(PRIMARY, snap)["status"] == OK
    assert report(PRIMARY2, snap)["status"] == OK


def test_a_probe_failing_for_the_whole_host_is_critical_for_each_of_its_servers():
    down = Probe.failed("SshConnectError: SSH to barman host (barman_host) failed: timed out")
    snap = snapshot(check=down, backups=down, servers=down, replication=down, files=down)
    for spec in (PRIMARY, PRIMARY2):
        rep = report(spec, snap)
        assert rep["status"] == CRITICAL
        by = by_check(rep)
        for probe in ("barman_check", "list_backups", "show_server", "wal_catalog", "wal_files", "disk_usage"):
            assert by[probe]["status"] == CRITICAL
            assert by[probe]["reason"] == f"{probe} could not be measured: {down.error}"
    assert "replication_status" in by_check(report(PRIMARY, snap))
    assert "replication_status" not in by_check(report(PRIMARY2, snap))  # no standby, nothing to measure


def test_only_check_all_failing_leaves_the_other_probes_measured():
    snap = snapshot(check=Probe.failed("BarmanCommandError: barman check all exited 2"))
    rep = report(PRIMARY2, snap)
    by = by_check(rep)
    assert by["barman_check"]["status"] == CRITICAL
    assert by["backup_freshness"]["status"] == OK and by["wal_continuity"]["status"] == OK
    assert "receive_wal" not in by  # it comes from check all: unknown, not "not running"


def test_receive_wal_stopped_is_critical_with_the_hint():
    check = load("check-all.json")
    check["pg-primary2"]["receive_wal_running"] = {"hint": "See the Barman log file for more details",
                                                   "status": "FAILED"}
    rep = report(PRIMARY2, snapshot(check=Probe(value=check)))
    by = by_check(rep)
    assert rep["status"] == CRITICAL
    assert by["receive_wal"]["status"] == CRITICAL and "barman cron" in by["receive_wal"]["hint"]
    assert by["barman_check.receive_wal_running"]["status"] == CRITICAL
    assert rep["facts"]["barman_check_failed"] == ["receive_wal_running"]
    assert report(PRIMARY, snapshot(check=Probe(value=check)))["status"] == OK


def test_slot_states_from_show_servers():
    info = load("show-servers-all.json")["pg-primary"]
    assert slot_active(info) is True
    assert slot_active({**info, "replication_slot": info["replication_slot"].replace("active=True", "active=False")}) \
        is False
    assert slot_active({**info, "replication_slot": None}) is None
    servers = load("show-servers-all.json")
    servers["pg-primary2"]["replication_slot"] = servers["pg-primary2"]["replication_slot"].replace(
        "active=True", "active=False")
    by = by_check(report(PRIMARY2, snapshot(servers=Probe(value=servers))))
    assert by["replication_slot"]["status"] == CRITICAL and "is not active" in by["replication_slot"]["reason"]
    servers["pg-primary2"]["replication_slot"] = None
    by = by_check(report(PRIMARY2, snapshot(servers=Probe(value=servers))))
    assert "does not exist" in by["replication_slot"]["reason"]


def test_primary_unreachable_through_barman_is_critical_and_lag_unknown():
    servers = load("show-servers-all.json")
    info = servers["pg-primary2"]
    info.update(current_xlog=None, replication_slot=None, connection_error="could not connect to server")
    rep = report(PRIMARY2, snapshot(servers=Probe(value=servers)))
    by = by_check(rep)
    assert by["primary_current_wal"]["status"] == CRITICAL
    assert "could not connect" in by["primary_current_wal"]["reason"]
    assert by["slot_state"]["status"] == CRITICAL
    assert "replication_slot" not in by  # unknown, not reported as missing
    assert by["wal_archive_lag"]["status"] == WARNING


def test_a_server_whose_catalogue_cannot_be_read_is_critical_alone():
    # pg-primary's xlogdb section fails (cat's error, exit 1) as the script prints it
    head, _, tail = files_text().partition("@@server pg-primary\n")
    _, _, rest = tail.partition("@@section files\n")
    text = head + "@@server pg-primary\n@@section xlogdb\ncat: /x/pg-primary-xlog.db: No such file or directory\n" \
        "@@rc 1\n@@section files\n" + rest
    snap = snapshot(files=Probe(value=parse_files_output(text)))
    by = by_check(report(PRIMARY, snap))
    assert by["wal_catalog"]["status"] == CRITICAL and "No such file" in by["wal_catalog"]["reason"]
    assert "wal_continuity" not in by
    assert report(PRIMARY2, snap)["status"] == OK


def test_a_segment_file_gone_from_disk_is_a_gap_even_if_catalogued():
    df, per = parse_files_output(files_text())
    files = per["pg-primary2"].sections["files"]
    begin = begin_wal_of(per["pg-primary2"].section("begin_wal"))
    segs = sorted(n for n in files.lines if n >= begin)
    victim = segs[1]
    per["pg-primary2"].sections["files"] = type(files)(lines=tuple(n for n in files.lines if n != victim))
    rep = report(PRIMARY2, snapshot(files=Probe(value=(df, per))))
    by = by_check(rep)
    assert rep["status"] == CRITICAL
    assert by["wal_continuity"]["status"] == CRITICAL and victim in by["wal_continuity"]["reason"]
    assert victim in rep["facts"]["wal"]["catalogued_files_missing"]


def test_one_db_host_unlisted_is_an_orphans_finding_for_its_servers_only():
    snap = snapshot(orphans=Probe(value={"pg-primary": "pg-standby: SshConnectError: refused", "pg-primary2": []}))
    by = by_check(report(PRIMARY, snap))
    assert by["orphans"]["status"] == CRITICAL and "pg-standby" in by["orphans"]["reason"]
    assert by_check(report(PRIMARY2, snap))["orphans"]["status"] == OK


def test_parse_listing_many_groups_scratch_directories_per_data_directory():
    text = ("@@dir /lab/pg/a/data\ndir 1024 /lab/pg/a/data.staged-abc\n@@dir /lab/pg/b/data\n"
            "pm 4242 /lab/pg/a/data.staged-abc\npm 77 /lab/pg/b/data\n")
    per_dir, pms = parse_listing_many(text)
    assert per_dir == {"/lab/pg/a/data": [("/lab/pg/a/data.staged-abc", 1024)], "/lab/pg/b/data": []}
    assert pms == {"/lab/pg/a/data.staged-abc": 4242, "/lab/pg/b/data": 77}


# ------------------------------------------------------------------------------ hook and summary


def test_check_all_exit_1_is_a_result_and_other_payloads_are_refused(monkeypatch):
    from barman_dr.exceptions import BarmanOutputError
    from barman_dr.hooks.barman import BarmanHook

    hook = BarmanHook(ssh_conn_id="x")
    failed = (FLEET / "check-all.json").read_text()

    def run(*args, **kwargs):
        raise BarmanCommandError("barman", ["barman", "-f", "json", *args], 1, "", failed)

    monkeypatch.setattr(hook, "run", run)
    assert set(hook.check_all()) == {"pg-primary", "pg-primary2"}

    def run2(*args, **kwargs):
        raise BarmanCommandError("barman", ["barman", *args], 2, "ssh: connect refused", "")

    monkeypatch.setattr(hook, "run", run2)
    with pytest.raises(BarmanCommandError):
        hook.check_all()
    monkeypatch.setattr(hook, "run_json", lambda *a, **k: ["not", "keyed"])
    with pytest.raises(BarmanOutputError):
        hook.list_backups_all()


def test_summary_reads_per_host_lists_and_counts_missing_servers_critical():
    from barman_dr.operators.scheduled import _flatten_reports
    from barman_dr.verification import summarise

    host1 = [{"server": "a", "status": "OK", "reasons": []}, {"server": "b", "status": "WARNING", "reasons": ["x"]}]
    pulled = [host1, None]  # the second host's task failed: no XCom
    reports = {s: None for s in ("a", "b", "c")}
    for r in _flatten_reports(pulled):
        reports[r["server"]] = r
    summary = summarise(reports)
    assert summary["servers"] == {"a": "OK", "b": "WARNING", "c": "CRITICAL"}
    assert _flatten_reports({"server": "a"}) == [{"server": "a"}]


def test_an_unknown_name_is_that_servers_finding_with_barmans_error(monkeypatch):
    """Barman 3.19.1 answers `check a ghost` with exit 1, a's section and `_ERROR: Unknown server 'ghost'`."""
    from barman_dr.hooks.barman import BarmanHook

    payload = {"_ERROR": ["Unknown server 'pg-ghost'"], **load("check-all.json")}
    hook = BarmanHook(ssh_conn_id="x")
    seen = []

    def run(*args, **kwargs):
        seen.append(args)
        raise BarmanCommandError("barman", ["barman", *args], 1, "", json.dumps(payload))

    monkeypatch.setattr(hook, "run", run)
    got = hook.check_all(["pg-primary2", "pg-ghost"])
    assert seen[-1] == ("check", "pg-primary2", "pg-ghost")
    hook.check_all()
    assert seen[-1] == ("check", "all")
    mine = own_sections(got, ["pg-primary2", "pg-ghost"])
    assert set(mine) == {"_ERROR", "pg-primary2"}
    snap = snapshot(check=Probe(value=mine))
    by = by_check(report(ServerSpec("pg-ghost"), snap))
    assert by["barman_check"]["status"] == CRITICAL
    assert "Unknown server 'pg-ghost'" in by["barman_check"]["reason"]
    assert report(PRIMARY2, snap)["status"] == OK


def test_the_batched_listing_finds_what_the_per_directory_script_finds(tmp_path):
    """LIST_MANY_SCRIPT over two data directories == LIST_SCRIPT run once per directory (real sh, du, ps)."""
    import subprocess

    from barman_dr.safety.orphans import LIST_MANY_SCRIPT, LIST_SCRIPT, parse_listing

    a, b = tmp_path / "a" / "data", tmp_path / "b" / "data"
    for d in (a, b, a.with_name("data.staged-0123456789"), a.with_name("data.staged-0123456789-wal"),
              b.parent / "salvage-feedbeef"):
        d.mkdir(parents=True)
    (a.with_name("data.staged-0123456789") / "f").write_bytes(b"x" * 5000)

    def sh(script: str, *args: str) -> str:
        return subprocess.run(["sh", "-c", script, "barman-dr", *args], capture_output=True, text=True,
                              check=True).stdout

    per_dir, _ = parse_listing_many(sh(LIST_MANY_SCRIPT, str(a), str(b)))
    for d in (a, b):
        assert per_dir[str(d)] == parse_listing(sh(LIST_SCRIPT, str(d)))[0]
    assert [p for p, _ in per_dir[str(a)]] == [str(a.with_name("data.staged-0123456789")),
                                               str(a.with_name("data.staged-0123456789-wal"))]
    assert [p for p, _ in per_dir[str(b)]] == [str(b.parent / "salvage-feedbeef")]


def test_the_files_exec_takes_paths_from_show_servers_and_still_reads_df_without_it():
    from types import SimpleNamespace

    from barman_dr.inventory import BarmanHost
    from barman_dr.operators.verify_host import BarmanHostVerificationOperator

    op = BarmanHostVerificationOperator(task_id="verify__barman_x", servers=["pg-primary2", "pg-ghost"])
    calls = []
    op.__dict__.update(
        fleet=[SimpleNamespace(name="pg-primary2"), SimpleNamespace(name="pg-ghost")],
        barman_host=BarmanHost(name="x", address="a", ssh_conn_id="c", barman_command=("barman",), job_dir="/j",
                               backup_directory="/b"),
        barman=SimpleNamespace(server_files=lambda directory, entries: calls.append((directory, entries)) or "ok"))
    servers = Probe(value=own_sections(load("show-servers-all.json"), ["pg-primary2", "pg-ghost"]))
    op._files(Probe(value=load("list-backups-all.json")), servers)
    directory, entries = calls[-1]
    info = load("show-servers-all.json")["pg-primary2"]
    oldest = min(b["backup_id"] for b in load("list-backups-all.json")["pg-primary2"])
    assert directory == "/b"
    assert entries == [("pg-primary2", f"{info['xlogdb_directory']}/pg-primary2-xlog.db", info["wals_directory"],
                        info["backup_directory"], oldest)]  # pg-ghost: not in show-servers, no paths to read
    op._files(Probe.failed("x"), Probe.failed("BarmanCommandError: show-servers died"))
    assert calls[-1] == ("/b", [])  # df alone
