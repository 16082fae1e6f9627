"""dr_find_target's pure half: the request, which WAL to decode, naming, ranking, the recommended target."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from barman_dr.exceptions import ValidationError
from barman_dr.forensics.find_target import (
    Catalog,
    WalSelectionError,
    build_candidates,
    catalog_inputs,
    catalog_sql,
    note_text,
    parse_catalog_result,
    recommend_backup,
    select_wal,
)
from barman_dr.forensics.waldump import TxnAggregator
from barman_dr.hooks.barman import WalCatalogEntry
from barman_dr.models import BackupInfo, Lsn
from barman_dr.operators.find_target import END_OF_WAL_RE
from barman_dr.params.find_target_request import validate_find_target_conf
from barman_dr.params.pitr_request import validate_pitr_conf

NOW = datetime(2026, 11, 25, 14, 0, 0, tzinfo=UTC)
EPOCH = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC).timestamp()
WALS = "/b/pg-primary/wals"
STREAM = "/b/pg-primary/streaming"


# ------------------------------------------------------------------------------ the request


def ok(inventory, **conf):
    return validate_find_target_conf({"server": "pg-primary", **conf}, inventory, now=NOW)


def rejected(inventory, field: str, **conf) -> ValidationError:
    with pytest.raises(ValidationError) as ei:
        validate_find_target_conf({"server": "pg-primary", **conf}, inventory, now=NOW)
    assert ei.value.field == field, str(ei.value)
    assert ei.value.fix
    return ei.value


def test_default_window_is_the_last_hour(inventory):
    req = ok(inventory)
    assert req.end == NOW and req.start == NOW - timedelta(hours=1)
    assert req.min_rows == 1 and req.table is None
    assert json.loads(json.dumps(req.to_dict())) == req.to_dict()


def test_window_with_timezones(inventory):
    req = ok(inventory, window_start="2026-11-25T13:45:00+01:00", window_end="2026-11-25T13:30:00Z")
    assert req.start == datetime(2026, 11, 25, 12, 45, tzinfo=UTC) and req.end == datetime(2026, 11, 25, 13, 30,
                                                                                           tzinfo=UTC)
    only_end = ok(inventory, window_end="2026-11-25T13:00:00Z")
    assert only_end.start == datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def test_window_rejections(inventory):
    assert "timezone" in str(rejected(inventory, "window_start", window_start="2026-11-25T13:45:00"))
    assert "timezone" in str(rejected(inventory, "window_end", window_end="2026-11-25 13:45"))
    assert "future" in str(rejected(inventory, "window_end", window_end="2026-11-25T15:00:00Z"))
    assert "before window_end" in str(rejected(inventory, "window_start", window_start="2026-11-25T13:50:00Z",
                                               window_end="2026-11-25T13:40:00Z"))
    assert "recovery window" in str(rejected(inventory, "window_start", window_start="2026-11-01T00:00:00Z"))


@pytest.mark.parametrize("table", ["critical_orders", "public.critical_orders", "_x$1", "Orders"])
def test_table_names_accepted(inventory, table):
    assert ok(inventory, table=table).table == table


@pytest.mark.parametrize("table", ["a.b.c", "crit'; DROP TABLE x", '"Orders"', "1abc", "a b", "a" * 64, "a;b",
                                   "public.", ".x"])
def test_table_names_rejected(inventory, table):
    rejected(inventory, "table", table=table)


@pytest.mark.parametrize("value", [-1, True, "10", 1.5])
def test_min_rows_rejected(inventory, value):
    rejected(inventory, "min_rows", min_rows=value)


def test_other_rejections(inventory):
    rejected(inventory, "server", server="nope")
    rejected(inventory, "incident_id", incident_id="INC 1")
    rejected(inventory, "confirm", confirm="PITR pg-primary")  # unknown here: dr_find_target never executes


# --------------------------------------------------------------------------- WAL selection


def seg(n: int, tli: int = 1) -> str:
    return f"{tli:08X}{n // 256:08X}{n % 256:08X}"


def entry(n: int, minutes: float, tli: int = 1, compression: str | None = None) -> WalCatalogEntry:
    return WalCatalogEntry(seg(n, tli), 16777216, EPOCH + minutes * 60, compression)


def at(minutes: float) -> datetime:
    return datetime.fromtimestamp(EPOCH + minutes * 60, UTC)


def names(sel) -> list[list[str]]:
    return [[f.name for f in r.files] for r in sel.runs]


def test_segments_of_the_window_with_one_segment_of_slack():
    catalog = [entry(n, 10 * n) for n in range(1, 10)]  # segment n archived at minute 10n
    sel = select_wal(catalog, [], wals_directory=WALS, streaming_directory=STREAM, timeline=1, switches=None,
                     start=at(35), end=at(55), margin_s=60)
    # segment 3 (archived 30 min) may hold a transaction that started before 35 min: the slack;
    # segment 6 (archived 60 min) is the first archived after the window's end
    assert names(sel) == [[seg(n) for n in range(3, 7)]]
    assert sel.runs[0].files[0].path == f"{WALS}/{seg(3)[:16]}/{seg(3)}" and sel.runs[0].end_lsn is None


def test_streamed_segments_are_newer_than_everything_archived():
    catalog = [entry(n, 10 * n) for n in range(1, 4)]
    sel = select_wal(catalog, [seg(4), seg(5) + ".partial", "barman.lock"], wals_directory=WALS,
                     streaming_directory=STREAM, timeline=1, switches=None, start=at(25), end=at(40))
    # segment 1 (archived at 10 min) is the slack; streamed segments have no known end: all are decoded
    assert names(sel) == [[seg(1), seg(2), seg(3), seg(4), seg(5)]]
    last = sel.runs[-1].files[-1]
    assert last.partial and last.path == f"{STREAM}/{seg(5)}.partial" and sel.runs[-1].partial


def test_abandoned_timeline_is_not_decoded():
    # timeline 2 forked at 0/5000100 (segment 5): timeline 1's segments 5.. belong to the abandoned branch
    catalog = [entry(n, n) for n in range(1, 8)] + [entry(n, 10 + n, tli=2) for n in range(5, 9)]
    sel = select_wal(catalog, [], wals_directory=WALS, streaming_directory=None, timeline=2,
                     switches=[(1, "0/5000100")], start=at(0), end=at(30), margin_s=0)
    assert names(sel) == [[seg(1), seg(2), seg(3), seg(4), seg(5)], [seg(n, 2) for n in range(5, 9)]]
    # the parent's switch segment is read up to the switch point only (a record crossing into it is kept)
    assert sel.runs[0].files[-1].timeline == 1 and sel.runs[0].end_lsn == "0/5000100"
    assert sel.runs[1].end_lsn is None


def test_gaps_are_named_and_split_runs():
    catalog = [entry(n, n) for n in (1, 2, 3, 6, 7)]
    sel = select_wal(catalog, [], wals_directory=WALS, streaming_directory=None, timeline=1, switches=None,
                     start=at(0), end=at(10), margin_s=0)
    assert names(sel) == [[seg(1), seg(2), seg(3)], [seg(6), seg(7)]]
    assert sel.gaps == [seg(4), seg(5)]


def test_long_runs_are_chunked_with_one_segment_of_overlap():
    catalog = [entry(n, n) for n in range(1, 11)]
    sel = select_wal(catalog, [], wals_directory=WALS, streaming_directory=None, timeline=1, switches=None,
                     start=at(0), end=at(20), margin_s=0, chunk=4)
    assert names(sel) == [[seg(n) for n in (1, 2, 3, 4)], [seg(n) for n in (4, 5, 6, 7)],
                          [seg(n) for n in (7, 8, 9, 10)]]


def test_compressed_segments_are_decompressed_with_the_standard_tool():
    sel = select_wal([entry(1, 1, compression="gzip"), entry(2, 2, compression="pybzip2"), entry(3, 3)], [],
                     wals_directory=WALS, streaming_directory=None, timeline=1, switches=None, start=at(0),
                     end=at(5))
    assert [f.how for f in sel.runs[0].files] == ["gzip", "bzip2", "link"]
    assert sel.runs[0].args()[:3] == [seg(1), f"{WALS}/{seg(1)[:16]}/{seg(1)}", "gzip"]
    with pytest.raises(WalSelectionError, match="snappy"):
        select_wal([entry(1, 1, compression="snappy")], [], wals_directory=WALS, streaming_directory=None,
                   timeline=1, switches=None, start=at(0), end=at(5))


def test_recorded_catalogue_selects_something(fixtures_dir):
    lines = (fixtures_dir / "barman" / "xlog-db.txt").read_text().splitlines()
    catalog = [WalCatalogEntry(p[0], int(p[1]), float(p[2]), None) for p in (x.split("\t") for x in lines)]
    end = datetime.fromtimestamp(max(e.time for e in catalog), UTC)
    sel = select_wal(catalog, [], wals_directory=WALS, streaming_directory=None, timeline=1, switches=None,
                     start=end - timedelta(hours=1), end=end)
    assert sel.segments == len(catalog) and not sel.gaps


def test_end_of_streamed_wal_is_recognised(fixtures_dir):
    assert END_OF_WAL_RE.search((fixtures_dir / "waldump" / "partial.stderr.txt").read_text())
    assert not END_OF_WAL_RE.search("pg_waldump: error: could not find file \"000000010000000000000007\"")


# ------------------------------------------------------------------------------- catalogue


def test_catalog_sql_holds_only_numbers_and_a_quoted_identifier():
    sql = catalog_sql([(1663, 16424)], [16390], "public.critical_orders")
    assert "(1663::oid, 16424::oid)" in sql and "(16390::oid)" in sql
    assert "lower('critical_orders')" in sql and "lower('public')" in sql
    empty = catalog_sql([], [], None)
    assert "(0::oid, 0::oid)" in empty and "'table_found', false" in empty
    assert "''" in catalog_sql([], [], "a'b")  # never reached (the validator refuses quotes), but escaped anyway


@pytest.fixture(scope="module")
def facts(fixtures_dir):
    return json.loads((fixtures_dir / "waldump" / "workload.json").read_text())


@pytest.fixture(scope="module")
def agg(fixtures_dir):
    a = TxnAggregator()
    a.feed_lines((fixtures_dir / "waldump" / "workload.waldump.txt").read_text().splitlines())
    return a


@pytest.fixture(scope="module")
def catalog(fixtures_dir, facts):
    cat = Catalog(available=True, databases={facts["database_oid"]: "shop"})
    answers = json.loads((fixtures_dir / "waldump" / "workload.catalog.json").read_text())
    parse_catalog_result(cat, facts["database_oid"], json.dumps(answers[str(facts["database_oid"])]))
    return cat


def test_catalog_inputs_cover_the_recorded_answer(agg, facts):
    inputs = catalog_inputs([*agg.committed, *agg.rewrites])
    filenodes, oids = inputs[facts["database_oid"]]
    assert (1663, facts["relations_before"]["wd_orders"]["relfilenode"]) in filenodes
    assert facts["relations_before"]["wd_scratch"]["oid"] in oids


def candidates(agg, catalog, **kw):
    args = {"server": "pg-primary", "start": datetime(2000, 1, 1, tzinfo=UTC), "end": datetime(2100, 1, 1, tzinfo=UTC),
            "table": None, "min_rows": 1, "limit": 20, "rewrites": agg.rewrites, **kw}
    return build_candidates(agg.committed, catalog, **args)


def test_ranking_and_naming(agg, catalog, facts):
    ranked, matched = candidates(agg, catalog)
    x = facts["xids"]
    assert [(c["xid"], c["kind"]) for c in ranked] == [
        (x["drop"], "DROP"), (x["truncate"], "TRUNCATE"), (x["delete"], "DELETE"), (x["subxact"], "DELETE"),
        (x["partition_move"], "UPDATE"), (x["sub_aborted"], "UPDATE")]
    assert matched == 6 and [c["rank"] for c in ranked] == list(range(1, 7))
    by = {c["xid"]: c for c in ranked}
    assert by[x["truncate"]]["summary"] == "TRUNCATE public.wd_scratch" and by[x["truncate"]]["whole_relation"]
    assert str(facts["relations_before"]["wd_gone"]["oid"]) in by[x["drop"]]["summary"]
    part = by[x["partition_move"]]["relations"][0]
    assert part["relation"] == "public.wd_parted_eu" and part["partition_of"] == "public.wd_parted"
    # wd_orders' file was replaced by the VACUUM FULL at the end: the WAL still says whose it was
    delete = by[x["delete"]]
    assert delete["summary"].startswith("DELETE 25 rows from public.wd_orders (old file ")
    assert "VACUUM FULL" in delete["summary"] and delete["relations"][0]["resolved"] is False


def test_target_is_the_commit_record_exclusive(agg, catalog, facts):
    ranked, _ = candidates(agg, catalog)
    delete = next(c for c in ranked if c["xid"] == facts["xids"]["delete"])
    t = next(t for t in agg.committed if t.xid == facts["xids"]["delete"])
    assert delete["target"] == {"target_xid": str(t.xid), "target_inclusive": False,
                                "target_lsn": str(Lsn(t.commit_lsn))}
    assert Lsn.parse(delete["first_lsn"]).value < t.commit_lsn


def test_table_filter_min_rows_and_window(agg, catalog, facts):
    x = facts["xids"]
    ranked, _ = candidates(agg, catalog, table="WD_ORDERS")
    assert [c["xid"] for c in ranked] == [x["delete"], x["subxact"], x["sub_aborted"]]
    ranked, _ = candidates(agg, catalog, table="public.wd_parted")  # a partition's parent matches
    assert [c["xid"] for c in ranked] == [x["partition_move"]]
    ranked, _ = candidates(agg, catalog, table="other.wd_orders")
    assert ranked == []
    ranked, _ = candidates(agg, catalog, min_rows=20)
    assert [c["xid"] for c in ranked] == [x["drop"], x["truncate"], x["delete"]]
    t = next(t for t in agg.committed if t.xid == x["delete"])
    ranked, _ = candidates(agg, catalog, start=t.commit_time, end=t.commit_time)
    assert [c["xid"] for c in ranked] == [x["delete"]]
    ranked, matched = candidates(agg, catalog, limit=2)
    assert len(ranked) == 2 and matched == 6


def test_without_the_catalogue_nothing_is_hidden(agg, facts):
    ranked, _ = candidates(agg, Catalog(available=False, error="the primary is down"), table="wd_orders")
    assert len(ranked) == 6
    assert not any(r["resolved"] for c in ranked for r in c["relations"])


def test_a_missing_table_keeps_the_drops(agg, facts):
    cat = Catalog(available=True, databases={facts["database_oid"]: "shop"}, table_found=False)
    ranked, _ = candidates(agg, cat, table="wd_gone")
    assert [c["kind"] for c in ranked] == ["DROP"]


def test_pitr_conf_is_accepted_by_dr_pitr(agg, catalog, inventory):
    ranked, _ = candidates(agg, catalog, incident_id="INC-9")
    for c in ranked:
        req = validate_pitr_conf(c["pitr_conf"], inventory, now=NOW)
        assert req.target.kind == "xid" and req.target.value == str(c["xid"]) and req.target.inclusive is False
        assert not req.confirmed and req.incident_id == "INC-9"
        assert re.fullmatch(r"[A-Za-z0-9 .,:_\-()/#@+=]*", req.reason or "")


def test_recommended_backup(fixtures_dir):
    info = BackupInfo.from_json(json.loads((fixtures_dir / "barman" / "show-backup.json").read_text()), "pg-primary")
    end = info.end_lsn.value
    assert recommend_backup([info], end + 1, info.timeline) == info.backup_id
    assert recommend_backup([info], end, info.timeline) == "auto"          # must end strictly before the commit
    assert recommend_backup([info], end + 1, info.timeline + 1) == "auto"  # another timeline: dr_pitr decides
    newer = replace(info, backup_id="20261126T000000", end_lsn=Lsn(end + 100))
    assert recommend_backup([info, newer], end + 200, info.timeline) == "20261126T000000"
    assert recommend_backup([info, replace(newer, status="FAILED")], end + 200, info.timeline) == info.backup_id


def test_note_is_short_and_says_what_to_do(agg, catalog):
    ranked, matched = candidates(agg, catalog)
    result = {"candidates": ranked, "matched": matched, "window": {"start": NOW.isoformat(), "end": NOW.isoformat()},
              "wal": {"segments": 2}, "warnings": ["w1"]}
    text = note_text("pg-primary", result)
    assert len(text) <= 1000 and "target_inclusive=false" in text and "warning: w1" in text
    assert "no destructive transaction" in note_text("pg-primary", {**result, "candidates": [], "matched": 0})
