"""The lab's tooling never initialises a cluster over a DR run's evidence (issue 18), without a lab."""

from __future__ import annotations

import pytest

from include.lab import labctl


def test_initdb_refuses_when_the_data_directory_was_moved_aside(tmp_path):
    lab = labctl.Lab(tmp_path)
    (tmp_path / "pg" / "pg-primary" / "data.pre-20261204T101500Z-abc123").mkdir(parents=True)
    with pytest.raises(SystemExit) as ei:
        lab.initdb("pg-primary", [])
    msg = str(ei.value)
    assert "data.pre-20261204T101500Z-abc123" in msg and "dr_pitr_rollback" in msg and "Nothing was changed" in msg
    assert not (tmp_path / "pg" / "pg-primary" / "data").exists()


def test_initdb_refuses_over_a_staged_copy_too(tmp_path):
    lab = labctl.Lab(tmp_path)
    (tmp_path / "pg" / "pg-primary" / "data.staged-abc123").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"data\.staged-abc123"):
        lab.initdb("pg-primary", [])


def test_an_owned_server_is_left_alone(tmp_path, capsys):
    lab = labctl.Lab(tmp_path)
    lab.dr_owners = lambda server: ["dr_pitr run 'r1' holds its lock (since now)"] if server == "pg-primary" else []
    lab.claim_owned()
    for part in ("pg-primary", "pg-standby", "pg-nonprod", "pgbouncer", "barman:pg-primary"):
        assert lab.leave_alone(part)
    assert not lab.leave_alone("pg-primary2")
    # each setup step returns before touching anything (no secrets, no processes: it would fail here otherwise)
    lab.setup_primary()
    lab.setup_standby()
    lab.setup_pgbouncer()
    assert "pg-primary: left alone, owned by a DR run" in capsys.readouterr().out


def test_chown_skips_a_file_that_vanishes_while_the_tree_is_walked(tmp_path, monkeypatch):
    """Barman's home is live while `up` runs: receive-wal's lock file may go between the listing and the chown."""
    import getpass
    import os

    (tmp_path / "home").mkdir()
    for name in ("a", ".pg-primary-receive-wal.lock", "z"):
        (tmp_path / "home" / name).write_text("x")
    done: list[str] = []
    real = os.lchown

    def lchown(path, uid, gid):
        if os.path.basename(path) == ".pg-primary-receive-wal.lock":
            os.unlink(path)  # receive-wal exited just now
            raise FileNotFoundError(2, "No such file or directory", path)
        done.append(os.path.basename(path))
        real(path, uid, gid)

    monkeypatch.setattr(labctl.os, "lchown", lchown)
    labctl.Lab(tmp_path).chown(tmp_path, getpass.getuser(), recursive=True)
    assert {"a", "z", "home"} <= set(done)


HISTORY_41 = "38\t1/172C5E98\tbefore transaction 2554\n\n39\t1/1D2D73F8\tbefore transaction 2576\n\n" \
             "40\t1/260000A0\tno recovery target specified\n"
#: pg-primary's pg_wal after it followed pg-delayed (timeline 40) and was promoted onto 41
PG_WAL_41 = {"00000028.history", "00000029.history", "000000280000000100000025", "000000280000000100000026.partial",
             "000000290000000100000026", "000000290000000100000027", "000000290000000100000028",
             "000000290000000100000029"}


def test_failback_keeps_a_partial_on_an_ancestor_before_its_switch():
    """Barman followed pg-delayed (timeline 40); pg-primary followed it and was promoted (41): no reset.

    A reset there restarted Barman at pg-primary's current segment and skipped 1/26..1/28
    (CI, 2026-12-05: the daily verification's "WAL missing" for the rest of the suite).
    """
    switches = labctl.history_switches(HISTORY_41)
    assert switches == {38: 0x1_172C5E98, 39: 0x1_1D2D73F8, 40: 0x1_260000A0}
    assert labctl.resumable("000000280000000100000026.partial", 41, switches, PG_WAL_41)  # read from 41's file
    assert labctl.resumable("000000280000000100000025.partial", 41, switches, PG_WAL_41)
    assert labctl.resumable("000000290000000100000029.partial", 41, switches, PG_WAL_41)
    # timeline 1 has no history file and pg_receivewal asks for none
    assert labctl.resumable("000000010000000000000005.partial", 2, {1: 0x0_060000A0},
                            {"00000002.history", "000000010000000000000005", "000000020000000000000006"})


def test_failback_resets_a_partial_pg_primary_cannot_serve():
    switches = labctl.history_switches(HISTORY_41)
    # a timeline that is not in pg-primary's history (a run failed before Barman followed the promoted server)
    assert not labctl.resumable("0000002A0000000100000027.partial", 41, switches, PG_WAL_41)
    # an ancestor, but past the point where it ended (the fenced primary kept writing after the target)
    assert not labctl.resumable("000000270000000100000020.partial", 41, switches, PG_WAL_41)
    # an ancestor before its end whose history file pg-primary never got (a clone has only its own timeline's)
    assert not labctl.resumable("00000027000000010000001D.partial", 41, switches, PG_WAL_41)
    # its segment recycled since
    assert not labctl.resumable("000000280000000100000024.partial", 41, switches, PG_WAL_41)


def test_each_segment_is_expected_on_the_timeline_the_history_reads_it_from():
    switches = labctl.history_switches(HISTORY_41)
    assert labctl.expected_timeline(0x125, 41, switches) == 40
    assert labctl.expected_timeline(0x126, 41, switches) == 41  # the switch segment: the child's file
    assert labctl.expected_timeline(0x11C, 41, switches) == 39
    assert labctl.seg_name(41, 0x126) == "000000290000000100000026"


def test_backfill_hands_over_what_barman_lacks_on_the_expected_timeline():
    switches = labctl.history_switches(HISTORY_41)
    # Barman has the old timeline's partial of 1/26 and 41's 1/29: 41's 1/26..1/28 are the reset's gap
    archived = {"000000280000000100000025", "000000280000000100000026.partial", "00000029.history",
                "000000290000000100000029"}
    todo = labctl.segments_to_backfill(0x125, 0x12A, archived, PG_WAL_41, 41, switches)
    assert todo == ["000000290000000100000026", "000000290000000100000027", "000000290000000100000028"]
    # nothing when Barman has them all; never the current segment
    assert labctl.segments_to_backfill(0x125, 0x129, archived | set(todo), PG_WAL_41, 41, switches) == []
