"""pg_waldump output -> records -> committed transactions, on output recorded from the lab.

tests/fixtures/waldump/workload.waldump.txt is real `TZ=UTC pg_waldump` (PostgreSQL 15.18)
output of a scripted workload (tests/fixtures/record_waldump.py; facts in workload.json).
The few synthetic lines below are marked as such: records the lab cannot produce
(wal_level=logical, a speculative insertion's abort, a non-UTC pg_waldump).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from barman_dr.forensics.waldump import (
    CommittedTxn,
    RelFileNode,
    TxnAggregator,
    WaldumpParseError,
    destructive_rank,
    parse_record,
    parse_xact_end,
)


@pytest.fixture(scope="module")
def facts(fixtures_dir):
    return json.loads((fixtures_dir / "waldump" / "workload.json").read_text())


@pytest.fixture(scope="module")
def lines(fixtures_dir):
    return (fixtures_dir / "waldump" / "workload.waldump.txt").read_text().splitlines()


@pytest.fixture(scope="module")
def agg(lines):
    a = TxnAggregator()
    a.feed_lines(lines)
    return a


def by_xid(agg: TxnAggregator) -> dict[int, CommittedTxn]:
    return {t.xid: t for t in agg.committed}


def rel(facts, name: str, when: str = "relations_before") -> RelFileNode:
    return RelFileNode(1663, facts["database_oid"], facts[when][name]["relfilenode"])


# ------------------------------------------------------------------------------ records


def test_every_line_of_the_recording_is_a_record(lines):
    assert lines and all(parse_record(line) is not None for line in lines)


def test_delete_record_fields(lines, facts):
    xid = facts["xids"]["delete"]
    line = next(x for x in lines if f"tx: {xid:>10}," in x and "desc: DELETE" in x)
    rec = parse_record(line)
    assert rec.rmgr == "Heap" and rec.tx == xid and rec.op == "DELETE"
    assert rec.blocks == (rel(facts, "wd_orders"),)
    assert "blkref" not in rec.desc and rec.desc.startswith("DELETE off ")


def test_non_record_lines_are_none():
    assert parse_record("") is None
    assert parse_record("pg_waldump: error: error in WAL record at 0/A07E790") is None


def test_fsm_and_vm_forks_are_not_row_blocks():
    line = ("rmgr: XLOG        len (rec/tot):     49/  8241, tx:        744, lsn: 0/090071B0, prev 0/09007178, "
            "desc: FPI_FOR_HINT , blkref #0: rel 1663/1/2619 fork fsm blk 2 FPW")
    assert parse_record(line).blocks == ()


def test_commit_with_rels_and_dropped_stats(lines, facts):
    xid = facts["xids"]["drop"]
    line = next(x for x in lines if f"tx: {xid:>10}," in x and "desc: COMMIT" in x)
    end = parse_xact_end(parse_record(line).desc)
    assert end.committed and end.time.tzinfo is UTC and end.twophase_xid is None
    gone = facts["relations_before"]["wd_gone"]
    assert RelFileNode(1663, facts["database_oid"], gone["relfilenode"]) in end.dropped_files
    assert (facts["database_oid"], gone["oid"]) in end.dropped_relations


def test_commit_lists_subxacts(lines, facts):
    xid = facts["xids"]["subxact"]
    line = next(x for x in lines if f"tx: {xid:>10}," in x and "desc: COMMIT" in x)
    assert len(parse_xact_end(parse_record(line).desc).subxacts) == 1


def test_relation_paths():
    assert RelFileNode.from_path("base/16389/16424") == RelFileNode(1663, 16389, 16424)
    assert RelFileNode.from_path("global/1262") == RelFileNode(1664, 0, 1262)
    assert RelFileNode.from_path("pg_tblspc/16400/PG_15_202209061/16389/16500") == RelFileNode(16400, 16389, 16500)
    assert RelFileNode(1664, 0, 1262).is_catalog and RelFileNode(1663, 5, 2619).is_catalog
    assert not RelFileNode(1663, 16389, 16424).is_catalog
    with pytest.raises(WaldumpParseError):
        RelFileNode.from_path("base/x/1")


def test_times_must_be_utc():
    # synthetic: what pg_waldump prints when its TZ is not UTC
    with pytest.raises(WaldumpParseError, match="TZ=UTC"):
        parse_xact_end("COMMIT 2026-11-25 20:04:36.775668 CET")
    with pytest.raises(WaldumpParseError):
        parse_xact_end("COMMIT yesterday")


def test_commit_prepared_names_the_prepared_xid():
    # synthetic (max_prepared_transactions is 0 in the lab): xactdesc.c prints "<xid>: <time>"
    end = parse_xact_end("COMMIT_PREPARED 770: 2026-11-25 19:04:36.775668 UTC")
    assert end.twophase_xid == 770 and end.committed
    assert parse_xact_end("ASSIGNMENT xtop 764: subxacts: 765") is None


# ------------------------------------------------------------------------- aggregation


def test_the_delete(agg, facts):
    t = by_xid(agg)[facts["xids"]["delete"]]
    assert t.counts == {rel(facts, "wd_orders"): (25, 0, 0)}
    assert t.rows_deleted == 25 and t.rows_updated == 0 and not t.dropped and not t.truncated_oids
    assert t.first_lsn < t.commit_lsn


def test_subtransaction_records_fold_into_the_top_transaction(agg, facts):
    t = by_xid(agg)[facts["xids"]["subxact"]]
    assert t.rows_deleted == 5 and t.rows_updated == 10 and t.subxacts == 1


def test_rolled_back_work_does_not_count(agg, facts):
    assert facts["xids"]["rolled_back"] not in by_xid(agg)
    t = by_xid(agg)[facts["xids"]["sub_aborted"]]
    assert t.rows_deleted == 0 and t.rows_updated == 3
    assert agg.aborts >= 2


def test_partition_move_counts_as_update(agg, facts):
    t = by_xid(agg)[facts["xids"]["partition_move"]]
    assert t.counts[rel(facts, "wd_parted_eu")][0] == 0
    assert t.rows_updated == 10 and t.rows_deleted == 0


def test_truncate_is_recognised(agg, facts):
    t = by_xid(agg)[facts["xids"]["truncate"]]
    assert (facts["database_oid"], facts["relations_before"]["wd_scratch"]["oid"]) in t.truncated_oids
    assert not t.dropped and not t.is_rewrite
    assert RelFileNode(1663, facts["database_oid"], facts["relations_after"]["wd_scratch"]["relfilenode"]) in t.created


def test_drop_is_recognised_table_first(agg, facts):
    t = by_xid(agg)[facts["xids"]["drop"]]
    assert t.dropped[0] == (facts["database_oid"], facts["relations_before"]["wd_gone"]["oid"])
    assert not t.truncated_oids


def test_vacuum_full_is_a_rewrite_not_a_candidate(agg, facts):
    oid = (facts["database_oid"], facts["relations_before"]["wd_orders"]["oid"])
    assert not any(oid in t.truncated_oids for t in agg.committed)
    assert [oid in t.rewritten_oids for t in agg.rewrites] == [True]
    assert rel(facts, "wd_orders") in agg.rewrites[0].dropped_files


def test_ranking_puts_whole_relation_kinds_first(agg, facts):
    order = [t.xid for t in sorted(agg.committed, key=destructive_rank)]
    assert order[:2] == sorted([facts["xids"]["truncate"], facts["xids"]["drop"]])
    assert order[2] == facts["xids"]["delete"]


def test_overlapping_runs_count_once(lines, agg):
    twice = TxnAggregator()
    twice.feed_lines(lines)
    twice.feed_lines(lines)  # the next run starts one segment earlier: the same records again
    assert twice.duplicates == len(lines)
    assert [(t.xid, t.counts) for t in twice.committed] == [(t.xid, t.counts) for t in agg.committed]


def test_keep_predicate_and_pruning(lines, facts):
    only_big = TxnAggregator(lambda t: t.rows_deleted >= 20)
    only_big.feed_lines(lines)
    assert [t.xid for t in only_big.committed] == [facts["xids"]["delete"]]
    small = TxnAggregator(max_kept=3, prune_to=2)
    small.feed_lines(lines)
    assert len(small.committed) <= 3 and small.pruned >= 1
    assert {facts["xids"]["truncate"], facts["xids"]["drop"]} <= {t.xid for t in small.committed}


def test_stats_are_json(agg):
    s = agg.stats()
    json.dumps(s)
    assert s["records"] > 0 and s["commits"] >= 7 and s["open_at_end"] == 0
    assert datetime.fromisoformat(s["first_commit"]) <= datetime.fromisoformat(s["last_commit"])
    json.dumps([t.to_dict() for t in agg.committed])


def _line(tx: int, lsn: str, desc: str) -> str:
    return f"rmgr: Heap        len (rec/tot):     54/    54, tx: {tx:>10}, lsn: {lsn}, prev 0/00000000, desc: {desc}"


def test_speculative_insertion_abort_is_not_a_row():
    # synthetic: INSERT ... ON CONFLICT losing a race logs a DELETE flagged XLH_DELETE_IS_SUPER (0x08)
    a = TxnAggregator()
    a.feed_line(_line(900, "0/1000", "DELETE off 3 flags 0x08 , blkref #0: rel 1663/16389/16424 blk 0"))
    a.feed_line(_line(900, "0/1100", "DELETE off 4 flags 0x00 KEYS_UPDATED , blkref #0: rel 1663/16389/16424 blk 0"))
    a.feed_line("rmgr: Transaction len (rec/tot):     34/    34, tx:        900, lsn: 0/1200, prev 0/1100, "
                "desc: COMMIT 2026-11-25 19:04:36.775668 UTC")
    assert a.committed[0].counts == {RelFileNode(1663, 16389, 16424): (1, 0, 0)}


def test_heap_truncate_record_of_wal_level_logical():
    # synthetic: with wal_level=logical a TRUNCATE also logs `Heap TRUNCATE ... relids`
    a = TxnAggregator()
    a.feed_line("rmgr: Standby     len (rec/tot):     42/    42, tx:        901, lsn: 0/2000, prev 0/1F00, "
                "desc: LOCK xid 901 db 16389 rel 16424 ")
    a.feed_line(_line(901, "0/2100", "TRUNCATE nrelids 1 relids 16424"))
    a.feed_line("rmgr: Transaction len (rec/tot):     34/    34, tx:        901, lsn: 0/2200, prev 0/2100, "
                "desc: COMMIT 2026-11-25 19:04:36.775668 UTC; rels: base/16389/16431")
    t = a.committed[0]
    assert t.truncated_oids == ((16389, 16424),) and t.commit_time == datetime(2026, 11, 25, 19, 4, 36, 775668,
                                                                               tzinfo=UTC)
