"""compute_coverage / WalCoverage.missing_ranges on Barman's real WAL catalogue and on crafted gaps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from barman_dr.hooks.barman import _CLOSED_WAL_RE, WalCoverage, compute_coverage
from barman_dr.models import BackupInfo, WalSegment

BARMAN = Path(__file__).resolve().parents[1] / "fixtures" / "barman"


def names(tli: int, first: int, last: int) -> list[str]:
    return [WalSegment(tli, n).name for n in range(first, last + 1)]


@pytest.fixture(scope="module")
def catalog() -> list[str]:
    return [line.split("\t")[0] for line in (BARMAN / "xlog-db.txt").read_text().splitlines() if line.strip()]


def test_recorded_catalogue_shape():
    for line in (BARMAN / "xlog-db.txt").read_text().splitlines():
        name, size, epoch, compression, encryption = line.split("\t")
        WalSegment.parse(name)
        assert int(size) == 16 * 1024 * 1024
        float(epoch)
        assert compression == "None" and encryption == "None"


def test_recorded_backup_is_covered(catalog):
    info = BackupInfo.from_json(json.loads((BARMAN / "show-backup.json").read_text()), "pg-primary")
    cov = compute_coverage(catalog, info.begin_wal, info.last_available_wal)
    assert cov.complete
    assert cov.present == 3  # ...08, ...09, ...0A
    assert cov.missing == ()
    assert cov.missing_ranges() == []
    assert cov.timelines == (1,)


def test_recorded_switch_wal_is_in_the_catalogue(catalog):
    switched = json.loads((BARMAN / "recording.json").read_text())["switched_wal"]
    assert switched in catalog
    info = json.loads((BARMAN / "switch-wal.json").read_text())["_INFO"]
    assert any((m := _CLOSED_WAL_RE.search(msg)) and m.group(1) == switched for msg in info)


def test_recorded_catalogue_until_later_segment(catalog):
    cov = compute_coverage(catalog, "000000010000000000000006", "00000001000000000000000D")
    assert not cov.complete
    assert cov.present == 6
    assert cov.missing == ("00000001000000000000000C", "00000001000000000000000D")
    assert cov.missing_ranges() == ["00000001000000000000000C..00000001000000000000000D (2)"]


def test_gap_detection():
    cat = names(1, 1, 3) + names(1, 6, 6) + names(1, 9, 10)
    cov = compute_coverage(cat, WalSegment(1, 1).name, WalSegment(1, 10).name)
    assert not cov.complete
    assert cov.present == 6
    assert cov.missing == tuple(names(1, 4, 5) + names(1, 7, 8))
    assert cov.missing_ranges() == [
        "000000010000000000000004..000000010000000000000005 (2)",
        "000000010000000000000007..000000010000000000000008 (2)",
    ]


def test_single_missing_segment_is_not_a_range():
    cat = names(1, 1, 4) + names(1, 6, 8)
    cov = compute_coverage(cat, WalSegment(1, 1).name, WalSegment(1, 8).name)
    assert cov.missing_ranges() == ["000000010000000000000005"]
    assert cov.to_dict() == {"first": "000000010000000000000001", "last": "000000010000000000000008",
                             "present": 7, "complete": False, "missing": ["000000010000000000000005"],
                             "timelines": [1]}


def test_missing_first_and_last():
    cov = compute_coverage(names(1, 2, 3), WalSegment(1, 1).name, WalSegment(1, 4).name)
    assert cov.missing == (WalSegment(1, 1).name, WalSegment(1, 4).name)
    assert cov.missing_ranges() == [WalSegment(1, 1).name, WalSegment(1, 4).name]


def test_empty_catalogue():
    cov = compute_coverage([], WalSegment(1, 5).name, WalSegment(1, 7).name)
    assert cov.present == 0 and len(cov.missing) == 3
    assert cov.missing_ranges() == ["000000010000000000000005..000000010000000000000007 (3)"]
    assert cov.timelines == ()


def test_across_xlog_id_boundary():
    # ...00000000FF is followed by ...0000000100000000 (16 MiB segments: 256 per xlog id)
    first, last = WalSegment(1, 0xFE), WalSegment(1, 0x101)
    assert first.name == "0000000100000000000000FE" and last.name == "000000010000000100000001"
    cat = [first.name, "0000000100000000000000FF", "000000010000000100000001"]
    cov = compute_coverage(cat, first.name, last.name)
    assert cov.missing == ("000000010000000100000000",)
    cov = compute_coverage([*cat, "000000010000000100000000"], first.name, last.name)
    assert cov.complete and cov.present == 4


def test_timeline_switch_covered():
    # backup on timeline 1, PITR promoted timeline 2 at segment 5: the newest WAL is on timeline 2
    cat = [*names(1, 1, 5), "00000002.history", *names(2, 5, 8)]
    cov = compute_coverage(cat, WalSegment(1, 1).name, WalSegment(2, 8).name)
    assert cov.complete
    assert cov.present == 8
    assert cov.timelines == (1, 2)


def test_timeline_switch_with_gap():
    cat = [*names(1, 1, 4), *names(2, 6, 8)]
    cov = compute_coverage(cat, WalSegment(1, 1).name, WalSegment(2, 8).name)
    assert not cov.complete
    # the missing segment is named on the first end's timeline (the last segment only on the last's)
    assert cov.missing == (WalSegment(1, 5).name,)


def test_other_timelines_do_not_count():
    # timeline 3 is outside [first.timeline, last.timeline]: a segment there proves nothing
    cat = [*names(1, 1, 2), *names(3, 3, 4)]
    cov = compute_coverage(cat, WalSegment(1, 1).name, WalSegment(2, 4).name)
    assert cov.missing == (WalSegment(1, 3).name, WalSegment(2, 4).name)
    assert cov.missing_ranges() == [WalSegment(1, 3).name, WalSegment(2, 4).name]


def test_missing_ranges_split_by_timeline():
    cov = WalCoverage(first="a", last="b", present=0,
                      missing=(WalSegment(1, 4).name, WalSegment(1, 5).name, WalSegment(2, 6).name,
                               WalSegment(2, 7).name), timelines=())
    assert cov.missing_ranges() == [
        "000000010000000000000004..000000010000000000000005 (2)",
        "000000020000000000000006..000000020000000000000007 (2)",
    ]


def test_reversed_ends_are_swapped():
    cov = compute_coverage(names(1, 1, 3), WalSegment(1, 3).name, WalSegment(1, 1).name)
    assert cov.first == WalSegment(1, 1).name and cov.last == WalSegment(1, 3).name
    assert cov.complete


def test_non_wal_names_are_ignored():
    cat = [*names(1, 1, 3), "00000001.history", "000000010000000000000002.00000028.backup",
           "000000010000000000000004.partial", "garbage", ""]
    cov = compute_coverage(cat, WalSegment(1, 1).name, WalSegment(1, 4).name)
    assert cov.missing == (WalSegment(1, 4).name,)  # a .partial file is not an archived segment


@pytest.mark.parametrize("bad", ["", "nope", "00000001000000000000000"])
def test_bad_ends(bad):
    with pytest.raises(ValueError):
        compute_coverage([], bad, WalSegment(1, 1).name)


def test_coverage_follows_the_timeline_history():
    """After a fork at 0/3000148 (segment 3), segments 3.. must be on timeline 2, not 1."""
    from barman_dr.hooks.barman import compute_coverage

    catalog = ["000000010000000000000001", "000000010000000000000002", "000000010000000000000003",
               "000000010000000000000004",  # the old timeline past the fork: useless for timeline 2
               "000000020000000000000003", "000000020000000000000005"]
    switches = [(1, "0/3000148")]
    cov = compute_coverage(catalog, "000000010000000000000001", "000000020000000000000005", switches)
    assert cov.missing == ("000000020000000000000004",)
    loose = compute_coverage(catalog, "000000010000000000000001", "000000020000000000000005")
    assert loose.complete  # the timeline-blind check would have passed
