"""BarmanHook against the real Barman 3.19.1 of the lab (no mocks)."""

from __future__ import annotations

import pytest

from barman_dr.exceptions import BarmanCommandError
from barman_dr.models import BackupInfo, CheckReport, WalSegment

pytestmark = pytest.mark.integration


def test_check_all_ok(barman, server_name):
    report = barman.check(server_name)
    assert isinstance(report, CheckReport)
    assert report.ok, f"failed checks: {report.failed}"
    names = {c.name for c in report.checks}
    assert {"postgresql", "receive_wal_running", "replication_slot", "wal_level", "minimum_redundancy_requirements"} \
        <= names


def test_list_backups_has_done_backups(barman, server_name, srv):
    backups = barman.list_backups(server_name)
    done = [b for b in backups if b.is_done]
    assert len(done) >= srv.minimum_redundancy
    for b in done:
        assert b.end_time is not None and b.size_bytes and b.size_bytes > 0


def test_backup_job_then_list_and_show(barman, server_name, srv, unique, write_soon):
    before = {b.backup_id for b in barman.list_backups(server_name)}
    writer = write_soon(1.0)
    job_id = f"test-backup-{unique}"
    result = barman.backup_job(server_name, job_id, wait_timeout=120, timeout=600)
    writer.join(timeout=30)
    assert result.exit_code == 0
    after = barman.list_backups(server_name)
    new = [b for b in after if b.backup_id not in before]
    assert len(new) == 1, f"expected exactly one new backup, got {[b.backup_id for b in new]}"
    summary = new[0]
    assert summary.status == "DONE"

    info = barman.show_backup(server_name, summary.backup_id)
    assert isinstance(info, BackupInfo)
    assert info.backup_id == summary.backup_id
    assert info.status == "DONE"
    assert info.begin_wal and WalSegment.parse(info.begin_wal)
    assert info.end_wal and WalSegment.parse(info.end_wal) >= WalSegment.parse(info.begin_wal)
    assert info.timeline >= 1
    assert info.begin_lsn is not None and info.end_lsn is not None and info.begin_lsn <= info.end_lsn
    assert info.begin_time and info.end_time and info.begin_time <= info.end_time
    assert info.backup_method == "postgres"
    assert info.pgdata == srv.primary.data_directory

    # the job's directory keeps its exit code: starting the same job id again attaches, never re-runs
    status = barman.host.start_job(barman.job_dir, job_id, ["false"])
    assert status.finished and status.exit_code == 0
    assert {b.backup_id for b in barman.list_backups(server_name)} == {b.backup_id for b in after}


def test_switch_wal_then_wal_catalog(barman, server_name, write_soon):
    writer = write_soon(0.5)
    closed = barman.switch_wal(server_name, archive_timeout=60)
    writer.join(timeout=30)
    assert closed is not None, "switch-wal reported no closed WAL file"
    WalSegment.parse(closed)
    catalog = barman.wal_catalog(server_name)
    names = [e.name for e in catalog]
    assert closed in names
    entry = next(e for e in catalog if e.name == closed)
    assert entry.size == 16 * 1024 * 1024 and entry.time > 0


def test_newest_backup_wal_coverage(barman, server_name):
    backups = [b for b in barman.list_backups(server_name) if b.is_done]
    newest = max(backups, key=lambda b: b.backup_id)
    info = barman.show_backup(server_name, newest.backup_id)
    cov = barman.wal_coverage(server_name, info.begin_wal, info.last_available_wal or info.end_wal)
    assert cov.complete, cov.missing_ranges()


def test_nonzero_exit_raises_barman_command_error(barman, server_name):
    with pytest.raises(BarmanCommandError) as ei:
        barman.show_backup(server_name, "20000101T000000")
    err = ei.value
    assert err.exit_code == 1
    assert err.argv[-3:] == ["show-backup", server_name, "20000101T000000"]
    assert err.argv[:len(barman.barman_command)] == barman.barman_command
    assert "Unknown backup" in str(err)
    # barman -f json prints its error as JSON on stdout ({"_ERROR": [...]})
    assert "_ERROR" in err.stdout


def test_barman_command_error_stderr_carries_the_reason(barman, server_name):
    with pytest.raises(BarmanCommandError) as ei:
        barman.show_backup(server_name, "20000101T000000")
    assert "Unknown backup" in ei.value.stderr


def test_unknown_server_raises(barman):
    with pytest.raises(BarmanCommandError) as ei:
        barman.list_backups("no-such-server")
    assert ei.value.exit_code != 0


def test_show_server_and_processes(barman, server_name):
    info = barman.show_server(server_name)
    assert info["backup_method"] == "postgres" and info["streaming_archiver"] is True
    assert any(p.get("name") == "receive-wal" for p in barman.list_processes(server_name))


def test_remote_job_long_poll_sees_the_exit_code_across_windows(barman, unique):
    """wait_job waits on the host in windows; a job outliving several windows still yields its exit code."""
    from barman_dr.exceptions import RemoteCommandError

    host = barman.host
    host.LONG_POLL_WINDOW = 1  # several windows for a ~2.5 s job
    try:
        with pytest.raises(RemoteCommandError) as ei:
            host.run_job(barman.job_dir, f"longpoll-{unique}", ["sh", "-c", "sleep 2.5; echo done; exit 3"], timeout=60)
        assert ei.value.exit_code == 3 and "done" in ei.value.stdout
        ok = host.run_job(barman.job_dir, f"longpoll-ok-{unique}", ["sh", "-c", "sleep 0.3; echo fine"], timeout=60)
        assert ok.exit_code == 0 and ok.stdout.strip() == "fine"
        assert host.wait_job(barman.job_dir, f"longpoll-ok-{unique}", timeout=5).exit_code == 0  # finished: at once
    finally:
        del host.LONG_POLL_WINDOW
