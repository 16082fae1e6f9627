"""DbHostHook against the lab's standby host (no mocks). The primary is never touched."""

from __future__ import annotations

import pytest

from barman_dr.exceptions import RemoteCommandError
from barman_dr.models import ControlData

pytestmark = pytest.mark.integration


@pytest.fixture
def standby_running(standby_host, standby):
    """Leave the standby running whatever the test did."""
    yield
    if standby_host.status(standby.data_directory) != "running":
        standby_host.start(standby, wait=True, timeout=120)
    standby_host.wait_ready(standby, timeout=120)


def test_standby_is_running_in_recovery(standby_host, standby):
    assert standby_host.status(standby.data_directory) == "running"
    assert standby_host.is_ready(standby)
    assert standby_host.in_recovery(standby) is True
    cd = standby_host.controldata(standby.data_directory)
    assert isinstance(cd, ControlData)
    assert cd.state == "in archive recovery"
    assert cd.timeline >= 1


def test_stop_and_start_standby(standby_host, standby, standby_running):
    before = standby_host.controldata(standby.data_directory)
    assert standby_host.stop(standby) == "stopped"
    assert standby_host.status(standby.data_directory) == "stopped"
    assert not standby_host.is_ready(standby)
    stopped = standby_host.controldata(standby.data_directory)
    assert stopped.state == "shut down in recovery"
    assert stopped.system_id == before.system_id
    # stop is idempotent
    assert standby_host.stop(standby) == "stopped"

    offset = standby_host.log_size(standby.log_file)
    standby_host.start(standby)
    assert standby_host.status(standby.data_directory) == "running"
    waited = standby_host.wait_ready(standby, timeout=120)
    assert waited >= 0
    assert standby_host.in_recovery(standby) is True
    after = standby_host.controldata(standby.data_directory)
    assert after.timeline == before.timeline
    assert after.system_id == before.system_id
    # the start logged into the inventory's log file, on the host's own address
    log = standby_host.log_since(standby.log_file, offset)
    assert "database system is ready to accept read-only connections" in log or "entering standby mode" in log
    # start is a no-op when running
    standby_host.start(standby)
    assert standby_host.status(standby.data_directory) == "running"


def test_status_of_missing_directory(standby_host, lab_dir):
    assert standby_host.status(f"{lab_dir}/hosts/pg-standby/does-not-exist") == "no-data"
    assert not standby_host.path_exists(f"{lab_dir}/hosts/pg-standby/does-not-exist")


def test_psql_over_socket(standby_host, standby):
    assert standby_host.psql(standby, "SELECT 40 + 2") == "42"
    with pytest.raises(RemoteCommandError) as ei:
        standby_host.psql(standby, "SELECT * FROM no_such_table")
    assert ei.value.exit_code != 0 and "no_such_table" in ei.value.stderr


# ---------------------------------------------------------------- move aside


@pytest.fixture
def scratch(standby_host, lab_dir, unique):
    """A scratch "data directory" on the standby host under $LAB_DIR: never a real one."""
    root = f"{lab_dir}/hosts/pg-standby/scratch-{unique}"
    path = f"{root}/data"
    standby_host.prepare_directory(path)
    standby_host.host.run(["sh", "-c", 'echo 15 > "$1/PG_VERSION"', "x", path])
    yield path
    # the scratch tree is ours alone: remove it (moved-aside copies included)
    standby_host.host.run(["rm", "-rf", "--", root], check=False)


def test_move_aside_is_idempotent(standby_host, scratch, unique):
    tag = f"t{unique[-8:]}"
    moved = standby_host.move_aside(scratch, tag)
    assert moved is not None
    assert moved.startswith(f"{scratch}.pre-") and moved.endswith(f"-{tag}")
    assert not standby_host.path_exists(scratch)
    assert standby_host.path_exists(f"{moved}/PG_VERSION")
    # a retried task finds the directory it already moved
    assert standby_host.move_aside(scratch, tag) == moved
    # another tag with nothing to move: nothing happens
    assert standby_host.move_aside(scratch, "other") is None


def test_move_back(standby_host, scratch, unique):
    tag = f"t{unique[-8:]}"
    moved = standby_host.move_aside(scratch, tag)
    standby_host.prepare_directory(scratch)  # e.g. a failed restore left a new directory
    out = standby_host.move_back(scratch, moved, "rollback")
    assert f"restored {scratch}" in out and "set-aside" in out
    assert standby_host.path_exists(f"{scratch}/PG_VERSION")
    assert not standby_host.path_exists(moved)


def test_move_aside_refuses_running_directory(standby_host, standby, scratch):
    # make the scratch directory look like a running cluster to `pg_ctl status`: a postmaster.pid
    # naming the standby's live postmaster (the real data directory itself is never offered to mv)
    pid = standby_host.host.run(["head", "-n", "1", f"{standby.data_directory}/postmaster.pid"]).stdout.strip()
    assert pid.isdigit()
    standby_host.host.run(["sh", "-c", 'printf "%s\\n%s\\n" "$2" "$1" > "$1/postmaster.pid"', "x", scratch, pid])
    assert standby_host.status(scratch) == "running"
    with pytest.raises(RemoteCommandError) as ei:
        standby_host.move_aside(scratch, "refused")
    assert ei.value.exit_code == 3
    assert "PostgreSQL is running" in ei.value.stderr
    assert standby_host.path_exists(f"{scratch}/PG_VERSION")  # not moved
    assert standby_host.status(standby.data_directory) == "running"


@pytest.mark.parametrize("tag", ["", "a b", "../x", "x;y", "t" * 81])
def test_move_aside_rejects_bad_tags(standby_host, scratch, tag):
    with pytest.raises(ValueError, match="tag"):
        standby_host.move_aside(scratch, tag)


# ------------------------------------------------------------ staged restore


def test_staged_restore_swap_in(standby_host, scratch, unique):
    """The staged copy is renamed into place only while it is the directory the staging produced."""
    from barman_dr.hooks.dbhost import staging_paths

    staged, wal = staging_paths(scratch, f"t{unique[-8:]}")
    assert staged == f"{scratch}.staged-t{unique[-8:]}" and wal == f"{staged}-wal"
    standby_host.prepare_directory(staged)
    standby_host.host.run(["sh", "-c", 'echo staged > "$1/marker"', "x", staged])
    ident = standby_host.dir_identity(staged)
    # the data directory still exists (not moved aside yet): refused, nothing moves
    with pytest.raises(RemoteCommandError) as ei:
        standby_host.swap_in_staged(staged, scratch, ident)
    assert ei.value.exit_code == 3 and "refusing to rename over it" in ei.value.stderr
    moved = standby_host.move_aside(scratch, "swap")
    # a directory that is not the staged restore (another device:inode) is refused
    with pytest.raises(RemoteCommandError) as ei:
        standby_host.swap_in_staged(staged, scratch, "0:0")
    assert ei.value.exit_code == 5
    assert standby_host.swap_in_staged(staged, scratch, ident) == "renamed"
    assert standby_host.path_exists(f"{scratch}/marker") and not standby_host.path_exists(staged)
    assert standby_host.dir_identity(scratch) == ident
    assert standby_host.path_exists(f"{moved}/PG_VERSION")  # the old directory is kept
    # a retry after the rename finds it done
    assert standby_host.swap_in_staged(staged, scratch, ident) == "already"


def test_remove_staging_removes_only_its_own_directories(standby_host, scratch, unique):
    from barman_dr.hooks.dbhost import staging_paths

    staged, wal = staging_paths(scratch, f"t{unique[-8:]}")
    for d in (staged, wal):
        standby_host.prepare_directory(d)
    for bad_staged, bad_wal in ((scratch, wal), (f"{scratch}.pre-x", wal), (staged, f"{scratch}-wal")):
        with pytest.raises(RemoteCommandError) as ei:
            standby_host.remove_staging(scratch, bad_staged, bad_wal)
        assert ei.value.exit_code == 3 and "refusing" in ei.value.stderr
    assert standby_host.path_exists(f"{scratch}/PG_VERSION")
    assert standby_host.remove_staging(scratch, staged, wal) == [staged, wal]
    assert not standby_host.path_exists(staged) and not standby_host.path_exists(wal)
    assert standby_host.remove_staging(scratch, staged, wal) == []


def test_free_space(standby_host, scratch):
    free = standby_host.free_space(scratch)
    assert free["available_bytes"] > 0 and free["size_bytes"] >= free["available_bytes"]
    assert free["mount_point"].startswith("/")
