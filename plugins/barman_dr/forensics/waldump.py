"""Read `pg_waldump` (PostgreSQL 15) output as typed records and fold it into committed transactions.

Why this exists: the seed's assessment was a human reading logs to guess a target time.
The WAL already says exactly which transaction deleted what, and when it committed.
`pg_waldump` prints one line per record::

    rmgr: Heap        len (rec/tot):     54/    54, tx:        759, lsn: 0/09000F48, prev 0/09000F10,
          desc: DELETE off 41 flags 0x00 KEYS_UPDATED , blkref #0: rel 1663/16389/16424 blk 0

`TxnAggregator` consumes such lines one at a time (the output of a large window never has
to fit in memory) and keeps, per committed transaction, what a DBA needs to pick a
recovery target: commit time and LSN, Heap DELETE / UPDATE / HOT_UPDATE counts per
relation file, the relation OIDs it locked AccessExclusive (Standby LOCK records: TRUNCATE,
DROP, rewrites), the files it created (Storage CREATE) and dropped (`rels:` of its COMMIT),
and the relations whose existence ended with it (`dropped stats:` of its COMMIT).
Records of subtransactions are folded into their top-level transaction at COMMIT; an
aborted transaction is forgotten. Names are resolved later, from the live catalogue
(`find_target.py`): the WAL only knows tablespace/database/relfilenode numbers.

pg_waldump must run with `TZ=UTC`: it prints commit times in its local time zone with an
abbreviation (`CET`, `EST`) that cannot be read back unambiguously; anything but `UTC` is
refused here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from barman_dr.exceptions import BarmanDrError
from barman_dr.models import Lsn

#: OIDs and relfilenodes below this belong to the catalogue created by initdb
FIRST_NORMAL_OBJECT_ID = 16384
DEFAULT_TABLESPACE_OID = 1663
GLOBAL_TABLESPACE_OID = 1664
#: pg_stat kind of a relation in a COMMIT's `dropped stats: kind/db/oid`
PGSTAT_KIND_RELATION = 2
#: Heap DELETE flags (heapam_xlog.h): a speculative insertion's abort, and an UPDATE moving a row to another partition
XLH_DELETE_IS_SUPER = 0x08
XLH_DELETE_IS_PARTITION_MOVE = 0x10

RECORD_RE = re.compile(
    r"^rmgr: (?P<rmgr>\S+)\s+len \(rec/tot\):\s*\d+/\s*(?P<tot>\d+), tx:\s*(?P<tx>\d+), "
    r"lsn: (?P<lsn>[0-9A-Fa-f]+/[0-9A-Fa-f]+), prev (?P<prev>[0-9A-Fa-f]+/[0-9A-Fa-f]+), desc: (?P<desc>.*)$")
#: a run of row records of one transaction on one relation, folded on the barman host (`wal_decode.COLLAPSE_AWK`):
#: `AGG <tx> <op> <flags> <spc/db/fn> <rows> <first lsn> <last lsn>`
AGG_RE = re.compile(r"^AGG (?P<tx>\d+) (?P<op>[A-Z_]+) (?P<flags>0x[0-9A-Fa-f]+|-) (?P<rel>\d+/\d+/\d+) (?P<rows>\d+) "
                    r"(?P<first>[0-9A-Fa-f]+/[0-9A-Fa-f]+) (?P<last>[0-9A-Fa-f]+/[0-9A-Fa-f]+)$")
#: WAL page and segment sizes (PostgreSQL's defaults, the only ones barman-dr supports)
XLOG_BLCKSZ = 8192
WAL_SEGMENT_SIZE = 16 * 1024 * 1024
#: page header sizes (SizeOfXLogShortPHD, SizeOfXLogLongPHD): the first page of a segment has the long one
SHORT_PAGE_HEADER = 24
LONG_PAGE_HEADER = 40
BLKREF_RE = re.compile(r", blkref #\d+: rel (\d+)/(\d+)/(\d+)(?: fork (\w+))? blk \d+")
COMMIT_TIME_RE = re.compile(r"^(?:(?P<twophase>\d+): )?(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) (?P<zone>\S+)")
LOCK_RE = re.compile(r"xid (\d+) db (\d+) rel (\d+)")
DELETE_FLAGS_RE = re.compile(r"flags 0x([0-9A-Fa-f]+)")
DROPPED_STAT_RE = re.compile(r"^(\d+)/(\d+)/(\d+)$")


class WaldumpParseError(BarmanDrError):
    """pg_waldump printed a record barman-dr cannot interpret safely."""


@dataclass(frozen=True, order=True)
class RelFileNode:
    """A relation file as the WAL names it: tablespace / database / relfilenode."""

    spc: int
    db: int
    fn: int

    def __str__(self) -> str:
        return f"{self.spc}/{self.db}/{self.fn}"

    @property
    def is_catalog(self) -> bool:
        """initdb's catalogue files and shared relations: never a user's table."""
        return self.db == 0 or self.fn < FIRST_NORMAL_OBJECT_ID

    @classmethod
    def from_path(cls, path: str) -> RelFileNode:
        """`base/DB/FN`, `global/FN` or `pg_tblspc/SPC/PG_15_.../DB/FN` (a COMMIT's `rels:`, Storage records)."""
        parts = path.split("/")
        try:
            if parts[0] == "base" and len(parts) == 3:
                return cls(DEFAULT_TABLESPACE_OID, int(parts[1]), int(parts[2]))
            if parts[0] == "global" and len(parts) == 2:
                return cls(GLOBAL_TABLESPACE_OID, 0, int(parts[1]))
            if parts[0] == "pg_tblspc" and len(parts) == 5:
                return cls(int(parts[1]), int(parts[3]), int(parts[4]))
        except ValueError:
            pass
        raise WaldumpParseError(f"not a relation path: {path!r}")


@dataclass(frozen=True)
class WalRecord:
    """One pg_waldump line. `blocks` are the main-fork relation files the record touches.

    `tot_len` and `prev` (the previous record's start) come from the record header: with
    them a record's exact boundaries are known, which is what the recovery proof checks.
    A folded run of row records (an `AGG` line) is one WalRecord with `rows` > 1 and the
    LSN of its last record in `last_lsn`.
    """

    rmgr: str
    tx: int
    lsn: int
    desc: str
    blocks: tuple[RelFileNode, ...] = ()
    tot_len: int = 0
    prev: int = 0
    rows: int = 1
    last_lsn: int | None = None

    @property
    def op(self) -> str:
        """The record type without its `+INIT` suffix: `DELETE`, `HOT_UPDATE`, `COMMIT`..."""
        return self.desc.split(" ", 1)[0].split("+", 1)[0]

    @property
    def end_lsn(self) -> int:
        """Where the next record may start (xlogreader's EndRecPtr); 0 when the length is unknown."""
        return record_end(self.lsn, self.tot_len) if self.tot_len else 0


def record_end(lsn: int, tot_len: int, *, page: int = XLOG_BLCKSZ, segment: int = WAL_SEGMENT_SIZE) -> int:
    """The end of a WAL record as xlogreader computes it (`EndRecPtr`, the LSN the history file records).

    A record that fits on its page ends at `lsn + MAXALIGN(tot_len)`. One that continues
    on the next pages skips each page's header (the long one at a segment's start), and
    ends at that last page's start + header + MAXALIGN(the bytes left on it). A record
    that ends exactly at a page boundary ends *there*: the next record starts after the
    next page's header, so a stop after it forks at the boundary itself.
    """
    def maxalign(n: int) -> int:
        return (n + 7) & ~7

    room = page - lsn % page
    if tot_len <= room:
        return lsn + maxalign(tot_len)
    left = tot_len - room
    pos = lsn + room  # the start of the next page
    while True:
        header = LONG_PAGE_HEADER if pos % segment == 0 else SHORT_PAGE_HEADER
        if left <= page - header:
            return pos + header + maxalign(left)
        left -= page - header
        pos += page


def parse_record(line: str) -> WalRecord | None:
    """A pg_waldump line (or a folded `AGG` line) as a record; None for anything else."""
    text = line.rstrip("\n")
    if text.startswith("AGG "):
        a = AGG_RE.match(text)
        if not a:
            return None
        spc, db, fn = (int(x) for x in a.group("rel").split("/"))
        flags = a.group("flags")
        desc = a.group("op") + ("" if flags == "-" else f" flags {flags}")
        return WalRecord("Heap", int(a.group("tx")), Lsn.parse(a.group("first")).value, desc,
                         (RelFileNode(spc, db, fn),), rows=int(a.group("rows")),
                         last_lsn=Lsn.parse(a.group("last")).value)
    m = RECORD_RE.match(text)
    if not m:
        return None
    desc = m.group("desc")
    blocks: list[RelFileNode] = []
    if m.group("rmgr") == "XLOG" and desc.startswith("RESTORE_POINT "):
        # a restore point's name is arbitrary text, printed raw: keep it as is (spaces, ', blkref' and all)
        return WalRecord("XLOG", int(m.group("tx")), Lsn.parse(m.group("lsn")).value, desc, (),
                         int(m.group("tot")), Lsn.parse(m.group("prev")).value)
    cut = desc.find(", blkref #")
    if cut >= 0:
        for b in BLKREF_RE.finditer(desc, cut):
            if b.group(4) is None:  # main fork only: fsm/vm/init forks are not rows
                blocks.append(RelFileNode(int(b.group(1)), int(b.group(2)), int(b.group(3))))
        desc = desc[:cut]
    return WalRecord(m.group("rmgr"), int(m.group("tx")), Lsn.parse(m.group("lsn")).value, desc.rstrip(),
                     tuple(blocks), int(m.group("tot")), Lsn.parse(m.group("prev")).value)


@dataclass(frozen=True)
class XactEnd:
    """A Transaction COMMIT / ABORT record's description, parsed."""

    committed: bool
    time: datetime
    twophase_xid: int | None
    subxacts: tuple[int, ...]
    dropped_files: tuple[RelFileNode, ...]
    dropped_relations: tuple[tuple[int, int], ...]  # (db, oid) from `dropped stats: 2/db/oid`


def parse_xact_end(desc: str) -> XactEnd | None:
    """`COMMIT 2026-11-25 19:04:36.825523 UTC; rels: base/16389/16417; dropped stats: 2/16389/16417; ...`.

    Also `COMMIT_PREPARED 770: <time>` and the ABORT forms. None for other Transaction records.
    """
    op, _, rest = desc.partition(" ")
    if op not in ("COMMIT", "COMMIT_PREPARED", "ABORT", "ABORT_PREPARED"):
        return None
    head, *sections = rest.split("; ")
    m = COMMIT_TIME_RE.match(head)
    if not m:
        raise WaldumpParseError(f"cannot read the time of {op} record: {desc[:120]!r}")
    if m.group("zone") != "UTC":
        raise WaldumpParseError(f"pg_waldump printed a {m.group('zone')!r} time ({desc[:60]!r}): run it with TZ=UTC")
    when = datetime.fromisoformat(m.group("ts")).replace(tzinfo=UTC)
    subxacts: list[int] = []
    files: list[RelFileNode] = []
    dropped: list[tuple[int, int]] = []
    for section in sections:
        label, _, values = section.partition(":")
        words = values.split()
        if label == "subxacts":
            subxacts += [int(w) for w in words if w.isdigit()]
        elif label == "rels":
            files += [RelFileNode.from_path(w) for w in words]
        elif label == "dropped stats":
            for w in words:
                s = DROPPED_STAT_RE.match(w)
                if s and int(s.group(1)) == PGSTAT_KIND_RELATION:
                    dropped.append((int(s.group(2)), int(s.group(3))))
    twophase = int(m.group("twophase")) if m.group("twophase") else None
    return XactEnd(op.startswith("COMMIT"), when, twophase, tuple(subxacts), tuple(files), tuple(dropped))


# ------------------------------------------------------------------------------ aggregation


@dataclass
class _Open:
    """What one (sub)transaction did so far."""

    first_lsn: int
    counts: dict[RelFileNode, list[int]] = field(default_factory=dict)  # [deleted, updated, hot_updated]
    locks: dict[tuple[int, int], None] = field(default_factory=dict)     # (db, oid), in lock order
    created: set[RelFileNode] = field(default_factory=set)
    smgr_truncated: set[RelFileNode] = field(default_factory=set)
    heap_truncated: dict[int, None] = field(default_factory=dict)         # relation OIDs (wal_level=logical)
    inserted: dict[RelFileNode, int] = field(default_factory=dict)

    def merge(self, other: _Open) -> None:
        self.first_lsn = min(self.first_lsn, other.first_lsn)
        for rel, c in other.counts.items():
            mine = self.counts.setdefault(rel, [0, 0, 0])
            for i in range(3):
                mine[i] += c[i]
        self.locks.update(other.locks)
        self.created |= other.created
        self.smgr_truncated |= other.smgr_truncated
        self.heap_truncated.update(other.heap_truncated)
        for rel, n in other.inserted.items():
            self.inserted[rel] = self.inserted.get(rel, 0) + n


@dataclass(frozen=True)
class CommittedTxn:
    """A committed transaction that deleted, updated, truncated or dropped something (JSON via `to_dict`)."""

    xid: int
    commit_time: datetime
    commit_lsn: int
    first_lsn: int
    counts: dict[RelFileNode, tuple[int, int, int]]  # deleted, updated, hot_updated
    locks: tuple[tuple[int, int], ...]
    created: frozenset[RelFileNode]
    smgr_truncated: frozenset[RelFileNode]
    heap_truncated: tuple[int, ...]
    dropped_files: tuple[RelFileNode, ...]
    dropped_relations: tuple[tuple[int, int], ...]
    subxacts: int
    #: rows inserted per relation file (not a reason to recover, but what a PITR discards)
    inserted: dict[RelFileNode, int] = field(default_factory=dict)
    #: the xids of its committed subtransactions (their rows carry those xids as xmin)
    subxact_ids: tuple[int, ...] = ()

    @property
    def rows_inserted(self) -> int:
        return sum(self.inserted.values())

    @property
    def rows_deleted(self) -> int:
        return sum(c[0] for c in self.counts.values())

    @property
    def rows_updated(self) -> int:
        return sum(c[1] + c[2] for c in self.counts.values())

    @property
    def transient(self) -> frozenset[tuple[int, int]]:
        """Relations created *and* dropped by this transaction: the temporary heap of a VACUUM FULL,
        CLUSTER or table-rewriting ALTER TABLE (a new relation's first relfilenode equals its OID)."""
        made = {(f.db, f.fn) for f in self.created}
        return frozenset(d for d in self.dropped_relations if d in made)

    @property
    def is_rewrite(self) -> bool:
        """VACUUM FULL / CLUSTER / ALTER TABLE rewrite: data kept, files swapped. Not destructive."""
        return bool(self.transient)

    @property
    def dropped(self) -> tuple[tuple[int, int], ...]:
        """Relations this transaction DROPped (in its lock order when known: the table named first)."""
        gone = [d for d in self.dropped_relations if d not in self.transient]
        order = {k: i for i, k in enumerate(self.locks)}
        return tuple(sorted(gone, key=lambda d: (order.get(d, len(order)), d)))

    @property
    def rewritten_oids(self) -> tuple[tuple[int, int], ...]:
        """(db, oid) of the relations a rewrite (VACUUM FULL, CLUSTER, ALTER TABLE) gave new files."""
        if not self.is_rewrite:
            return ()
        gone = set(self.dropped_relations)
        return tuple(lock for lock in self.locks if lock not in gone)

    @property
    def truncated_oids(self) -> tuple[tuple[int, int], ...]:
        """(db, oid) of relations whose files were replaced by empty ones: TRUNCATE.

        A Heap TRUNCATE record (wal_level=logical) says so explicitly. Otherwise (wal_level=replica)
        a TRUNCATE is a transaction that dropped files, locked relations that still exist, and made
        no transient relation (that would be a rewrite, which keeps the rows).
        """
        dbs = {db for db, _ in self.locks} or {f.db for f in self.dropped_files}
        out: dict[tuple[int, int], None] = {}
        for oid in self.heap_truncated:
            for db in sorted(dbs):
                out[(db, oid)] = None
        if self.dropped_files and not self.is_rewrite:
            gone = set(self.dropped_relations)
            for lock in self.locks:
                if lock not in gone:
                    out[lock] = None
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "xid": self.xid, "commit_time": self.commit_time.isoformat(), "commit_lsn": str(Lsn(self.commit_lsn)),
            "first_lsn": str(Lsn(self.first_lsn)),
            "counts": {str(k): list(v) for k, v in sorted(self.counts.items())},
            "locks": [list(x) for x in self.locks], "created": sorted(str(f) for f in self.created),
            "smgr_truncated": sorted(str(f) for f in self.smgr_truncated), "heap_truncated": list(self.heap_truncated),
            "dropped_files": [str(f) for f in self.dropped_files], "dropped_relations": [list(x) for x in self.dropped_relations],
            "subxacts": self.subxacts,
        }


def destructive_rank(t: CommittedTxn) -> tuple[int, int, int]:
    """Sort key, smallest first: DROP/TRUNCATE first (they remove every row: the WAL has no count), then rows."""
    whole = 0 if (t.dropped or t.truncated_oids or t.smgr_truncated) else 1
    return (whole, -(t.rows_deleted + t.rows_updated), t.commit_lsn)


class TxnAggregator:
    """Fold pg_waldump lines into `CommittedTxn`s, one line at a time.

    `keep(txn)` decides at COMMIT whether a transaction is worth keeping (the time window,
    the minimum row count): the rest is dropped at once. When more than `max_kept` are kept,
    only the `prune_to` most destructive survive (`pruned` counts the others), so a busy
    window cannot exhaust the worker's memory. Records at or before the last LSN seen are
    skipped: overlapping pg_waldump runs (one segment of overlap at chunk and timeline
    boundaries, so no record straddling a boundary is lost) are counted once.
    """

    def __init__(self, keep: Callable[[CommittedTxn], bool] | None = None, *, max_kept: int = 50_000,
                 prune_to: int = 10_000, on_commit: Callable[[CommittedTxn], None] | None = None,
                 on_record: Callable[[WalRecord], None] | None = None) -> None:
        self.keep = keep or (lambda t: True)
        #: called with every committed transaction, row-less ones included (what a PITR discards)
        self.on_commit = on_commit
        #: called with every record before it is folded (commit records, restore points...)
        self.on_record = on_record
        self.max_kept = max_kept
        self.prune_to = prune_to
        self.open: dict[int, _Open] = {}
        self.committed: list[CommittedTxn] = []
        #: rewrites (VACUUM FULL...) of the decoded range: not candidates, but they say which table an old file was
        self.rewrites: list[CommittedTxn] = []
        self.last_lsn = -1
        self.records = 0
        self.duplicates = 0
        self.commits = 0
        self.aborts = 0
        self.pruned = 0
        self.first_commit: datetime | None = None
        self.last_commit: datetime | None = None

    def _txn(self, xid: int, lsn: int) -> _Open:
        t = self.open.get(xid)
        if t is None:
            t = self.open[xid] = _Open(first_lsn=lsn)
        return t

    def feed_lines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.feed_line(line)

    def feed_line(self, line: str) -> None:
        rec = parse_record(line)
        if rec is not None:
            self.feed(rec)

    def feed(self, rec: WalRecord) -> None:
        if rec.lsn <= self.last_lsn:
            self.duplicates += 1
            return
        self.last_lsn = rec.last_lsn or rec.lsn
        self.records += 1
        if self.on_record is not None:
            self.on_record(rec)
        if rec.rmgr == "Heap2" and rec.op == "MULTI_INSERT":
            if rec.blocks and rec.tx and not rec.blocks[0].is_catalog:
                words = rec.desc.split()
                rows = int(words[1]) if len(words) > 1 and words[1].isdigit() else 1
                t = self._txn(rec.tx, rec.lsn)
                t.inserted[rec.blocks[0]] = t.inserted.get(rec.blocks[0], 0) + rows
        elif rec.rmgr == "Heap":
            self._heap(rec)
        elif rec.rmgr == "Transaction":
            self._xact(rec)
        elif rec.rmgr == "Standby" and rec.op == "LOCK":
            for xid, db, oid in LOCK_RE.findall(rec.desc):
                if int(db) != 0 and int(oid) >= FIRST_NORMAL_OBJECT_ID:
                    self._txn(int(xid), rec.lsn).locks[(int(db), int(oid))] = None
        elif rec.rmgr == "Storage" and rec.tx:
            words = rec.desc.split()
            if rec.op == "CREATE" and len(words) >= 2:
                self._txn(rec.tx, rec.lsn).created.add(RelFileNode.from_path(words[1]))
            elif rec.op == "TRUNCATE" and len(words) >= 2:
                rel = RelFileNode.from_path(words[1])
                if not rel.is_catalog:
                    self._txn(rec.tx, rec.lsn).smgr_truncated.add(rel)

    def _heap(self, rec: WalRecord) -> None:
        op = rec.op
        if op == "TRUNCATE":  # wal_level=logical: `TRUNCATE nrelids 1 relids 16424`
            _, _, ids = rec.desc.partition(" relids ")
            t = self._txn(rec.tx, rec.lsn)
            for w in ids.split():
                if w.isdigit() and int(w) >= FIRST_NORMAL_OBJECT_ID:
                    t.heap_truncated[int(w)] = None
            return
        if op not in ("DELETE", "UPDATE", "HOT_UPDATE", "INSERT", "MULTI_INSERT") or not rec.blocks or not rec.tx:
            return
        rel = rec.blocks[0]
        if rel.is_catalog:
            return
        if op in ("INSERT", "MULTI_INSERT"):
            t = self._txn(rec.tx, rec.lsn)
            t.inserted[rel] = t.inserted.get(rel, 0) + rec.rows
            return
        slot = 0
        if op == "DELETE":
            m = DELETE_FLAGS_RE.search(rec.desc)
            flags = int(m.group(1), 16) if m else 0
            if flags & XLH_DELETE_IS_SUPER:
                return  # an INSERT ... ON CONFLICT that lost the race: no row existed
            if flags & XLH_DELETE_IS_PARTITION_MOVE:
                slot = 1
        elif op == "UPDATE":
            slot = 1
        else:
            slot = 2
        self._txn(rec.tx, rec.lsn).counts.setdefault(rel, [0, 0, 0])[slot] += rec.rows

    def _xact(self, rec: WalRecord) -> None:
        end = parse_xact_end(rec.desc)
        if end is None:
            return
        xid = end.twophase_xid or rec.tx
        state = self.open.pop(xid, None)
        subs = [self.open.pop(s, None) for s in end.subxacts]
        if not end.committed:
            self.aborts += 1
            return
        self.commits += 1
        self.first_commit = self.first_commit or end.time
        self.last_commit = end.time
        for s in subs:
            if s is not None:
                state = state or _Open(first_lsn=s.first_lsn)
                state.merge(s)
        if state is None and not end.dropped_files and self.on_commit is None:
            return
        state = state or _Open(first_lsn=rec.lsn)
        txn = CommittedTxn(
            xid=xid, commit_time=end.time, commit_lsn=rec.lsn, first_lsn=state.first_lsn,
            counts={k: (v[0], v[1], v[2]) for k, v in state.counts.items()}, locks=tuple(state.locks),
            created=frozenset(state.created), smgr_truncated=frozenset(state.smgr_truncated),
            heap_truncated=tuple(state.heap_truncated), dropped_files=end.dropped_files,
            dropped_relations=end.dropped_relations, subxacts=len(end.subxacts), inserted=dict(state.inserted),
            subxact_ids=tuple(end.subxacts))
        if self.on_commit is not None:
            self.on_commit(txn)
        if txn.is_rewrite and txn.rewritten_oids and len(self.rewrites) < self.prune_to:
            self.rewrites.append(txn)
        if not (txn.counts or txn.dropped or txn.truncated_oids or txn.smgr_truncated):
            return  # e.g. a VACUUM FULL, or a catalogue-only change
        if not self.keep(txn):
            return
        self.committed.append(txn)
        if len(self.committed) > self.max_kept:
            self.committed.sort(key=destructive_rank)
            self.pruned += len(self.committed) - self.prune_to
            del self.committed[self.prune_to:]

    def stats(self) -> dict[str, Any]:
        return {"records": self.records, "duplicate_records_skipped": self.duplicates, "commits": self.commits,
                "aborts": self.aborts, "kept": len(self.committed), "rewrites": len(self.rewrites), "pruned": self.pruned,
                "open_at_end": len(self.open),
                "first_commit": self.first_commit.isoformat() if self.first_commit else None,
                "last_commit": self.last_commit.isoformat() if self.last_commit else None}
