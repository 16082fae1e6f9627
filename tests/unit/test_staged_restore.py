"""Staged restore: the staging paths and the free-space check (pure functions, no lab)."""

from __future__ import annotations

import pytest

from barman_dr.exceptions import PreflightError
from barman_dr.hooks.dbhost import staging_paths
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
