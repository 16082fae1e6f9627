"""Staged restore: the staging paths, the staging postmaster's options and the free-space check (no lab)."""

from __future__ import annotations

import shlex

import pytest

from barman_dr.exceptions import PreflightError
from barman_dr.hooks.dbhost import staged_instance, staged_start_options, staging_paths
from barman_dr.inventory import Instance
from barman_dr.operators.pitr import SEGMENT_BYTES, check_staging_space

MIB = 1024 * 1024


def test_staging_paths_are_siblings_of_the_data_directory():
    staged, wal = staging_paths("/srv/pg/data/", "abc123")
    assert staged == "/srv/pg/data.staged-abc123"
    assert wal == "/srv/pg/data.staged-abc123-wal"


@pytest.mark.parametrize("tag", ["", "../x", "a b", "x;rm"])
def test_staging_paths_refuse_odd_tags(tag):
    with pytest.raises(ValueError):
        staging_paths("/srv/pg/data", tag)


def free(avail: int) -> dict:
    return {"path": "/srv/pg", "available_bytes": avail, "size_bytes": 10 * avail + 1, "mount_point": "/srv"}


def test_enough_space():
    out = check_staging_space("db1", free(1000 * MIB), 500 * MIB, 10)
    assert out["needed_bytes"] == int((500 * MIB + 10 * SEGMENT_BYTES) * 1.1)


def test_not_enough_space_names_the_numbers_and_the_fix():
    with pytest.raises(PreflightError) as ei:
        check_staging_space("db1", free(600 * MIB), 500 * MIB, 10)
    msg = str(ei.value)
    assert "db1:/srv" in msg and "726 MiB" in msg and "500 MiB" in msg and "160 MiB" in msg and "600 MiB" in msg
    assert "staged_restore=false" in msg and "Nothing was stopped" in msg


def test_the_staging_postmaster_is_private_and_cannot_touch_the_live_server():
    live = Instance(name="pg-primary", host="db1", data_directory="/srv/pg/data", port=5432,
                    socket_directory="/run/postgresql", log_file="/var/log/pg.log", postgres_conn_id="pg")
    staged = staged_instance(live, "/srv/pg/data.staged-abc123")
    # its socket and log live in <staged>-run: not in Barman's WAL staging directory (deleted at promotion)
    assert staged.socket_directory == "/srv/pg/data.staged-abc123-run"
    assert staged.log_file == "/srv/pg/data.staged-abc123-run/postgresql.log"
    assert staged.data_directory != live.data_directory and staged.name == "pg-primary-staged"
    argv = shlex.split(staged_start_options(staged, "256MB"))
    opts = dict(a.split("=", 1) for a in argv if a != "-c")
    assert opts["listen_addresses"] == ""  # no TCP
    assert opts["unix_socket_directories"] == staged.socket_directory
    assert opts["data_directory"] == staged.data_directory  # a restored config may name the live directory
    assert opts["external_pid_file"].startswith(staged.socket_directory + "/")
    # archive_mode as configured (the new timeline's files get .ready), but nothing archived from the copy
    assert "archive_mode" not in opts and opts["archive_command"] == "false" and opts["archive_library"] == ""
    # no jobs, workers or streaming of its own once promoted
    assert opts["shared_preload_libraries"] == "" and opts["max_logical_replication_workers"] == "0"
    assert opts["primary_conninfo"] == "" and opts["primary_slot_name"] == ""
    assert opts["shared_buffers"] == "256MB" and opts["max_wal_size"] == "1GB" and opts["huge_pages"] == "try"
    # a log the proof can read
    assert opts["logging_collector"] == "off" and opts["log_destination"] == "stderr" and opts["lc_messages"] == "C"
