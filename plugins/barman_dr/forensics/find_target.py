"""Find the bad transaction: which WAL to decode, what the relations are called, how to rank, where to stop.

The pure half of dr_find_target (the operator in `operators/find_target.py` does the I/O):

* `select_wal`: the segments Barman holds that can contain commits of the time window,
  on the damaged server's timeline history only, as pg_waldump runs.
* `catalog_sql` / `parse_catalog`: relfilenodes and OIDs from the WAL to `schema.table`
  through the live catalogue (`pg_filenode_relation`, `pg_class`).
* `build_candidates`: destructive transactions, filtered (window, table, min_rows) and
  ranked, each with the exact recovery target and a ready-to-run dr_pitr conf.

**Which segments.** Barman's WAL catalogue (`xlog.db`) records when each segment was
archived (Barman host clock). Every record of a segment was written before that moment,
so a segment archived before `window_start - margin` cannot hold a commit of the window:
decoding starts at the newest such segment (one segment of slack, for a transaction that
began just before the window) and stops at the first segment archived after
`window_end + margin` (the margin absorbs clock skew between the database and Barman
hosts). Then each commit's own timestamp (from the WAL) is compared with the window.
Segments still in the streaming directory (not yet archived by `barman cron`, and the
`.partial` being written) are newer than everything archived: they are decoded too, so a
DELETE committed seconds ago is found even when the primary is down and no WAL switch
was possible.

**Which target.** `recovery_target_xid = X` with `recovery_target_inclusive = false` stops
at X's COMMIT record, without applying it: every transaction whose commit record comes
before it is kept, even one committed in the same second. The equivalent LSN target is the
*start* of X's COMMIT record: with `recovery_target_inclusive = false` recovery stops
before the first record at or after `recovery_target_lsn`, so everything before the commit
is replayed and X is left uncommitted (i.e. rolled back). X's *first* record would be
wrong: transactions committed between X's first record and its commit (the app kept
writing during a long DELETE) would be thrown away too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from barman_dr.forensics.wal_selection import (  # noqa: F401 - re-exported: the selection used to live here
    DECOMPRESSORS,
    DecodeRun,
    WalFile,
    WalSelection,
    WalSelectionError,
    select_wal,
)
from barman_dr.forensics.waldump import CommittedTxn, RelFileNode
from barman_dr.models import BackupInfo, Lsn

TABLE_KINDS = frozenset("rpmf")  # table, partitioned table, materialized view, foreign table
SYSTEM_SCHEMAS = frozenset({"pg_catalog", "pg_toast", "information_schema"})
KIND_ORDER = {"DROP": 0, "TRUNCATE": 1, "DELETE": 2, "UPDATE": 3}
WHOLE_RELATION_KINDS = frozenset({"DROP", "TRUNCATE"})
REASON_BAD_CHARS_RE = re.compile(r"[^A-Za-z0-9 .,:_\-()/#@+=]")
MAX_RELATIONS_PER_CANDIDATE = 10


# ------------------------------------------------------------------------------ the live catalogue


@dataclass(frozen=True)
class RelInfo:
    schema: str
    name: str
    kind: str
    root: str | None = None   # the partitioned table at the top, for a partition

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def is_user_table(self) -> bool:
        return self.kind in TABLE_KINDS and self.schema not in SYSTEM_SCHEMAS and not self.schema.startswith("pg_temp")


@dataclass
class Catalog:
    """What the live catalogue says about the WAL's numbers. `available` is False when it could not be asked."""

    available: bool = False
    error: str | None = None
    databases: dict[int, str] = field(default_factory=dict)
    filenodes: dict[tuple[int, int, int], RelInfo] = field(default_factory=dict)   # (db, spc, relfilenode)
    oids: dict[tuple[int, int], RelInfo] = field(default_factory=dict)             # (db, oid)
    table_found: bool = False


def _lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


DATABASES_SQL = "SELECT coalesce(json_object_agg(oid::text, datname), '{}') FROM pg_database WHERE datallowconn"


def catalog_sql(filenodes: Iterable[tuple[int, int]], oids: Iterable[int], table: str | None) -> str:
    """One query, one JSON line: the relations behind (tablespace, relfilenode) pairs and OIDs, in the current database.

    Only integers we parsed ourselves and a validated identifier (quoted anyway) go in.
    `pg_filenode_relation` resolves mapped catalogues too and treats the database's
    default tablespace like PostgreSQL does.
    """
    fn_rows = ", ".join(f"({int(s)}::oid, {int(f)}::oid)" for s, f in sorted(set(filenodes))) or "(0::oid, 0::oid)"
    oid_rows = ", ".join(f"({int(o)}::oid)" for o in sorted(set(oids))) or "(0::oid)"
    rel = ("json_build_array(n.nspname, c.relname, c.relkind::text, rn.nspname || '.' || rc.relname)")
    joins = ("LEFT JOIN pg_namespace n ON n.oid = c.relnamespace "
             "LEFT JOIN pg_class rc ON rc.oid = pg_partition_root(c.oid) "
             "LEFT JOIN pg_namespace rn ON rn.oid = rc.relnamespace")
    if table:
        schema, _, name = table.rpartition(".")
        cond = f"lower(t.relname) = lower({_lit(name)})" + (f" AND lower(tn.nspname) = lower({_lit(schema)})" if schema else "")
        table_sql = (f"(SELECT count(*) > 0 FROM pg_class t JOIN pg_namespace tn ON tn.oid = t.relnamespace "
                     f"WHERE t.relkind IN ('r', 'p', 'm', 'f') AND {cond})")
    else:
        table_sql = "false"
    return (
        f"WITH f(spc, fn) AS (VALUES {fn_rows}), o(id) AS (VALUES {oid_rows}) SELECT json_build_object("
        f"'filenodes', (SELECT coalesce(json_agg(json_build_array(f.spc, f.fn, {rel})), '[]') FROM f "
        f"JOIN pg_class c ON c.oid = pg_filenode_relation(f.spc, f.fn) {joins}), "
        f"'oids', (SELECT coalesce(json_agg(json_build_array(o.id, {rel})), '[]') FROM o "
        f"JOIN pg_class c ON c.oid = o.id {joins}), "
        f"'table_found', {table_sql})"
    )


def catalog_inputs(txns: Iterable[CommittedTxn]) -> dict[int, tuple[set[tuple[int, int]], set[int]]]:
    """Per database OID: the (tablespace, relfilenode) pairs and the relation OIDs to resolve."""
    out: dict[int, tuple[set[tuple[int, int]], set[int]]] = {}

    def slot(db: int) -> tuple[set[tuple[int, int]], set[int]]:
        return out.setdefault(db, (set(), set()))

    for t in txns:
        for f in (*t.counts, *t.smgr_truncated):
            slot(f.db)[0].add((f.spc, f.fn))
        for db, oid in (*t.truncated_oids, *t.rewritten_oids):
            slot(db)[1].add(oid)
    return out


def parse_catalog_result(catalog: Catalog, db: int, text: str) -> None:
    """Merge one database's `catalog_sql` answer into `catalog`."""
    data = json.loads(text)

    def info(row: Sequence[Any]) -> RelInfo:
        return RelInfo(str(row[0]), str(row[1]), str(row[2]), row[3] if row[3] else None)

    for row in data.get("filenodes") or []:
        catalog.filenodes[(db, int(row[0]), int(row[1]))] = info(row[2])
    for row in data.get("oids") or []:
        catalog.oids[(db, int(row[0]))] = info(row[1])
    catalog.table_found = catalog.table_found or bool(data.get("table_found"))


# ---------------------------------------------------------------------------------- candidates


def _matches(info: RelInfo | None, table: str | None) -> bool:
    if not table:
        return True
    if info is None:
        return False
    schema, _, name = table.lower().rpartition(".")
    names = [(info.schema.lower(), info.name.lower())]
    if info.root:
        rs, _, rn = info.root.lower().partition(".")
        names.append((rs, rn))
    return any(n == name and (not schema or s == schema) for s, n in names)


@dataclass(frozen=True)
class Replacement:
    """A later transaction of the window dropped this file: a TRUNCATE (or DROP) of `names`."""

    xid: int
    kind: str
    names: tuple[RelInfo, ...]
    file: RelFileNode | None = None

    def label(self, f: RelFileNode) -> str:
        names = ", ".join(n.qualified for n in self.names)
        if not names:
            return f"relfilenode {f} (replaced by {self.kind} xid {self.xid})"
        return f"{names} (old file {f}, replaced by {self.kind} xid {self.xid})"


def replacements(txns: Iterable[CommittedTxn], catalog: Catalog) -> dict[RelFileNode, Replacement]:
    """Files dropped by the window's TRUNCATEs and DROPs, with the tables those named.

    A DELETE recorded on a file that a later TRUNCATE replaced cannot be named from the
    live catalogue any more (it maps the *new* file). The WAL still links the old file to
    the truncated table's family (its heap, TOAST or indexes): that is shown, and lets the
    table filter keep such a DELETE.
    """
    out: dict[RelFileNode, Replacement] = {}
    for t in sorted(txns, key=lambda t: t.commit_lsn):
        family = t.truncated_oids or t.rewritten_oids
        if not t.dropped_files or not (family or t.dropped):
            continue
        names = tuple(i for i in (catalog.oids.get(o) for o in family) if i is not None and i.is_user_table)
        kind = "TRUNCATE" if t.truncated_oids else "VACUUM FULL/CLUSTER/ALTER TABLE" if t.rewritten_oids else "DROP"
        for f in t.dropped_files:
            out.setdefault(f, Replacement(t.xid, kind, names, f))
    return out


def _relations(t: CommittedTxn, catalog: Catalog, table: str | None,
               replaced: dict[RelFileNode, Replacement] | None = None) -> list[dict[str, Any]]:
    """What the transaction did to which user table, as the live catalogue names it."""
    rels: list[dict[str, Any]] = []
    filter_by_name = bool(table) and catalog.available
    replaced = replaced or {}

    def entry(info: RelInfo | None, db: int, fallback: str, rep: Replacement | None = None,
              **counts: Any) -> dict[str, Any] | None:
        if info is not None and not info.is_user_table:
            return None
        if filter_by_name and not (_matches(info, table) or (rep and any(_matches(n, table) for n in rep.names))):
            return None
        if info:
            label = info.qualified
        elif rep and rep.file is not None:
            label = rep.label(rep.file)
        else:
            label = f"{fallback} ({'not in the live catalogue' if catalog.available else 'catalogue not reachable'})"
        return {"relation": label, "resolved": info is not None, "partition_of": info.root if info else None,
                "database": catalog.databases.get(db, str(db)), **counts}

    for f, (deleted, updated, hot) in sorted(t.counts.items()):
        info = catalog.filenodes.get((f.db, f.spc, f.fn))
        e = entry(info, f.db, f"relfilenode {f}", None if info else replaced.get(f), operation=None,
                  deleted=deleted, updated=updated + hot, hot_updated=hot)
        if e:
            e["operation"] = "DELETE" if deleted else "UPDATE"
            rels.append(e)
    first_lock = t.locks[0] if t.locks else None
    for db, oid in t.truncated_oids:
        info = catalog.oids.get((db, oid))
        if info is None and (db, oid) != first_lock:
            continue  # the toast table and indexes of a truncated table: named through the table
        e = entry(info, db, f"oid {oid}", operation="TRUNCATE", deleted=None, updated=0, hot_updated=0)
        if e:
            rels.append(e)
    for f in sorted(t.smgr_truncated):
        e = entry(catalog.filenodes.get((f.db, f.spc, f.fn)), f.db, f"relfilenode {f}", operation="TRUNCATE",
                  deleted=None, updated=0, hot_updated=0)
        if e:
            rels.append(e)
    if t.dropped and not (filter_by_name and catalog.table_found):
        db, oid = t.dropped[0]
        # a dropped relation's name left the catalogue with it: its OID is all the WAL keeps
        rels.append({"relation": f"oid {oid} (dropped: no longer in the catalogue)", "resolved": False,
                     "partition_of": None, "database": catalog.databases.get(db, str(db)), "operation": "DROP",
                     "deleted": None, "updated": 0, "hot_updated": 0, "dependent_relations": len(t.dropped) - 1,
                     "files_dropped": len(t.dropped_files)})
    return rels


def _kind(rels: Sequence[dict[str, Any]]) -> str | None:
    ops = {r["operation"] for r in rels}
    for k in ("DROP", "TRUNCATE", "DELETE", "UPDATE"):
        if k in ops:
            return k
    return None


def rank_key(c: dict[str, Any]) -> tuple[int, int, int, int]:
    """DROP and TRUNCATE first (they remove every row; the WAL has no count), then rows affected, descending."""
    return (0 if c["kind"] in WHOLE_RELATION_KINDS else 1, -int(c["rows_affected"]), KIND_ORDER[c["kind"]],
            Lsn.parse(c["commit_lsn"]).value)


def summary_text(c: dict[str, Any]) -> str:
    rels = c["relations"]
    names = ", ".join(r["relation"] for r in rels[:3]) + (f" (+{len(rels) - 3})" if len(rels) > 3 else "")
    if c["kind"] == "DROP":
        return f"DROP {names}"
    if c["kind"] == "TRUNCATE":
        return f"TRUNCATE {names}"
    if c["kind"] == "DELETE":
        extra = f", {c['rows_updated']} updated" if c["rows_updated"] else ""
        return f"DELETE {c['rows_deleted']} rows from {names}{extra}"
    return f"UPDATE {c['rows_updated']} rows of {names}"


def recommend_backup(backups: Sequence[BackupInfo], commit_lsn: int, timeline: int) -> str:
    """The newest DONE backup of this timeline that ended before the commit, else `auto`.

    dr_pitr's `auto` starts an xid target from the *oldest* backup (it cannot know when an
    xid happened); we can, so we name a closer backup and spare the replay of days of WAL.
    A backup of an older timeline is left to `auto` (dr_pitr then passes --target-tli).
    """
    ok = [b for b in backups if b.status == "DONE" and b.timeline == timeline and b.end_lsn is not None
          and b.end_lsn.value < commit_lsn]
    return max(ok, key=lambda b: b.end_lsn.value if b.end_lsn else 0).backup_id if ok else "auto"


def pitr_conf(server: str, c: dict[str, Any], backup_id: str, incident_id: str | None) -> dict[str, Any]:
    """A dr_pitr conf that stops right before the candidate's transaction. Without `confirm`: dr_pitr plans first."""
    reason = REASON_BAD_CHARS_RE.sub("_", f"undo xid {c['xid']}: {c['summary']}")[:500]
    return {"server": server, "target_xid": str(c["xid"]), "target_inclusive": False, "backup_id": backup_id,
            "incident_id": incident_id, "reason": reason, "expected": {}}


def build_candidates(txns: Iterable[CommittedTxn], catalog: Catalog, *, server: str, start: datetime, end: datetime,
                     table: str | None, min_rows: int, limit: int, backups: Sequence[BackupInfo] = (),
                     timeline: int = 1, incident_id: str | None = None,
                     rewrites: Iterable[CommittedTxn] = ()) -> tuple[list[dict[str, Any]], int]:
    """The ranked candidates (at most `limit`) and how many matched in all.

    `rewrites` (VACUUM FULL and the like, from the aggregator) only help name old files.
    """
    out = []
    txns = list(txns)
    replaced = replacements([*txns, *rewrites], catalog)
    for t in txns:
        if not start <= t.commit_time <= end:
            continue
        rels = _relations(t, catalog, table, replaced)
        kind = _kind(rels)
        if kind is None:
            continue
        deleted = sum(r["deleted"] or 0 for r in rels)
        updated = sum(r["updated"] for r in rels)
        if kind not in WHOLE_RELATION_KINDS and deleted + updated < min_rows:
            continue
        rels.sort(key=lambda r: (KIND_ORDER[r["operation"]], -((r["deleted"] or 0) + r["updated"]), r["relation"]))
        c = {"xid": t.xid, "kind": kind, "commit_time": t.commit_time.isoformat(), "commit_lsn": str(Lsn(t.commit_lsn)),
             "first_lsn": str(Lsn(t.first_lsn)), "rows_deleted": deleted, "rows_updated": updated,
             "rows_affected": deleted + updated, "whole_relation": kind in WHOLE_RELATION_KINDS,
             "subtransactions": t.subxacts, "relations": rels[:MAX_RELATIONS_PER_CANDIDATE],
             "more_relations": max(len(rels) - MAX_RELATIONS_PER_CANDIDATE, 0)}
        c["summary"] = summary_text(c)
        out.append((c, t))
    out.sort(key=lambda ct: rank_key(ct[0]))
    ranked = []
    for i, (c, t) in enumerate(out[:limit], 1):
        c["rank"] = i
        c["target"] = {"target_xid": str(t.xid), "target_inclusive": False, "target_lsn": str(Lsn(t.commit_lsn))}
        c["pitr_conf"] = pitr_conf(server, c, recommend_backup(backups, t.commit_lsn, timeline), incident_id)
        ranked.append(c)
    return ranked, len(out)


def note_text(server: str, result: dict[str, Any], limit: int = 5, budget: int = 980) -> str:
    """The run note: the top candidates in a few lines, within Airflow's note size (the audit trail has them all)."""
    cands = result.get("candidates") or []
    head = (f"dr_find_target {server}: {result.get('matched', len(cands))} candidate(s), commits "
            f"{result['window']['start'][:19]} .. {result['window']['end'][:19]} UTC "
            f"({result.get('wal', {}).get('segments', 0)} WAL segments decoded)")
    lines = [head]
    if not cands:
        lines.append("no destructive transaction found: widen the window, lower min_rows or drop the table filter")
    tail = [f"warning: {w[:150]}" for w in (result.get("warnings") or [])[:2]]
    used = sum(len(x) + 1 for x in (*lines, *tail))
    for c in cands[:limit]:
        t = c["target"]
        line = (f"{c['rank']}. {c['summary'][:120]} | xid {c['xid']} committed {c['commit_time'][11:23]} | "
                f"target_xid {t['target_xid']} or target_lsn {t['target_lsn']}, target_inclusive=false")
        if used + len(line) + 1 > budget:
            lines.append("... (all candidates: audit trail, DR page)")
            break
        lines.append(line)
        used += len(line) + 1
    return "\n".join([*lines, *tail])
