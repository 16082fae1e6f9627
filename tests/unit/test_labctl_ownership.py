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
