"""Resolve a recovery target to the exact WAL record recovery will stop at, before anything moves (pure).

PostgreSQL decides where recovery stops record by record while it replays, from the
backup it starts at. A target is only exactly right when we know, before the restore,
which record that will be. This module mirrors PostgreSQL 15's `recoveryStopsBefore` /
`recoveryStopsAfter` on the records pg_waldump prints:

* `time T`: the first COMMIT or ABORT record whose time is after T (at or after T when
  exclusive); recovery stops *before* it.
* `xid X`: X's COMMIT (or ABORT) record; *before* it when exclusive, *after* it when
  inclusive. An aborted X, or an X never seen, is refused.
* `lsn L`: the first record that starts at or after L; before or after it.
* `name N`: a RESTORE_POINT record named N; *after* it. PostgreSQL stops at the **first**
  one it meets while replaying; names are reused (`before_deploy` at every deploy), so
  every occurrence in the WAL Barman holds is listed, and a name created more than once
  is refused unless the request picks one (`target_name_lsn`). The restore then uses the
  chosen occurrence's exact LSN (inclusive) instead of the name: recovery can stop
  nowhere else, whichever backup it starts from, and Barman never writes an arbitrary
  name (quotes, newlines) into postgresql.auto.conf.
* `immediate`: the end of the chosen backup (consistency).

The stop record fixes the backup (`choose_backup`: the newest DONE backup on the
recovery's timeline path that ended before it: only the WAL after that backup is
replayed) and the proof (`StopPoint.switch_range`: the new timeline must fork between
the stop record's neighbours, so a stop one record early or late fails the proof).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from barman_dr.exceptions import PreflightError, ValidationError
from barman_dr.forensics.waldump import CommittedTxn, RelFileNode, WalRecord, parse_record, parse_xact_end
from barman_dr.models import BackupInfo, Lsn, RecoveryTarget, WalSegment

WAL_SEGMENT_BYTES = 16 * 1024 * 1024
#: how many transactions the plan and the report list one by one (the totals count them all)
TOP_TRANSACTIONS = 10


def lsn_text(value: int | None) -> str | None:
    return None if value is None else str(Lsn(value))


def xid_in_future(xid: int, next_xid: int) -> bool:
    """Whether `xid` has not been assigned yet, given the server's next full (64-bit) xid.

    A full xid (above 2^32, with its epoch) compares as is. A 32-bit xid is compared
    modulo 2^32 like PostgreSQL does: it is in the future when it lies less than 2^31
    ahead of the next xid (after a wraparound a small value is an old xid, not a new one).
    """
    if xid > 0xFFFFFFFF:
        return xid >= next_xid
    return (xid - (next_xid & 0xFFFFFFFF)) % 2**32 < 2**31


# ------------------------------------------------------------------------------ timelines


def timeline_of_lsn(lsn: int, switches: Sequence[tuple[int, str]], current: int) -> int:
    """The timeline a recovery along `current`'s history is on at `lsn` (a switch LSN belongs to the child)."""
    for parent, switch in sorted(switches, key=lambda s: Lsn.parse(s[1]).value):
        if lsn < Lsn.parse(switch).value:
            return parent
    return current


def on_path(backup: BackupInfo, switches: Sequence[tuple[int, str]], current: int) -> bool:
    """A backup recovery along `current`'s history can start from: begun and ended on the path's timeline there."""
    if backup.begin_lsn is None or backup.end_lsn is None:
        return False
    return (timeline_of_lsn(backup.begin_lsn.value, switches, current) == backup.timeline
            and timeline_of_lsn(backup.end_lsn.value, switches, current) == backup.timeline)


# ------------------------------------------------------------------------------ the stop point


@dataclass(frozen=True)
class StopPoint:
    """The record recovery will stop at, and on which side of it.

    `lsn` is the record's start (the LSN PostgreSQL logs), `prev_lsn` its predecessor's
    start, `end_lsn` where it ends (xlogreader's EndRecPtr). For `consistency` (a target
    `immediate`) `lsn` is the backup's end as Barman records it and `prev_lsn` its begin:
    Barman's end can lie past the record where PostgreSQL reaches consistency (seen: a
    segment boundary), so the fork is only known to be between the two.
    """

    kind: str                    # commit | abort | restore_point | record | consistency
    when: str                    # before | after
    lsn: str
    timeline: int
    prev_lsn: str | None = None
    end_lsn: str | None = None
    xid: int | None = None
    time: str | None = None      # the commit/abort time (UTC); for a restore point, the last commit before it
    name: str | None = None
    rmgr: str | None = None
    desc: str | None = None

    def switch_range(self) -> tuple[int, int] | None:
        """(low, high]: where the new timeline must fork (the history file's switch LSN) for this stop."""
        if self.kind == "consistency" and self.prev_lsn:
            return Lsn.parse(self.prev_lsn).value, Lsn.parse(self.lsn).value
        if self.when == "before" and self.prev_lsn:
            return Lsn.parse(self.prev_lsn).value, Lsn.parse(self.lsn).value
        if self.when == "after" and self.end_lsn:
            return Lsn.parse(self.lsn).value, Lsn.parse(self.end_lsn).value
        return None

    @property
    def discard_from(self) -> int:
        """The first LSN whose commit the PITR gives up: the stop record itself when stopping before it."""
        if self.when == "before":
            return Lsn.parse(self.lsn).value
        return Lsn.parse(self.end_lsn or self.lsn).value + (0 if self.end_lsn else 1)

    def describe(self) -> str:
        what = {"commit": f"commit of transaction {self.xid}", "abort": f"abort of transaction {self.xid}",
                "restore_point": f"restore point {self.name!r}", "record": f"{self.rmgr} record",
                "consistency": "the end of the backup (consistency)"}.get(self.kind, self.kind)
        when = "" if self.kind == "consistency" else f"{self.when} "
        at = f" at {self.time}" if self.time and self.kind in ("commit", "abort") else ""
        return f"{when}{what} (LSN {self.lsn}, timeline {self.timeline}){at}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        rng = self.switch_range()
        d["switch_range"] = [lsn_text(rng[0]), lsn_text(rng[1])] if rng else None
        d["described"] = self.describe()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StopPoint:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})


def stop_from_record(rec: WalRecord, when: str, timeline: int, *, kind: str | None = None,
                     name: str | None = None, time: datetime | None = None, xid: int | None = None) -> StopPoint:
    """A StopPoint at a decoded record: its boundaries from the record header."""
    end = parse_xact_end(rec.desc) if rec.rmgr == "Transaction" else None
    if kind is None:
        kind = ("commit" if end.committed else "abort") if end else "record"
    if end is not None:
        time = time or end.time
        xid = xid if xid is not None else (end.twophase_xid or rec.tx)
    end_lsn = rec.end_lsn or None
    if rec.rmgr == "XLOG" and rec.op == "SWITCH":
        # xlogreader ends a WAL switch record at the start of the next segment
        end_lsn = (rec.lsn // WAL_SEGMENT_BYTES + 1) * WAL_SEGMENT_BYTES
    return StopPoint(kind=kind, when=when, lsn=str(Lsn(rec.lsn)), timeline=timeline,
                     prev_lsn=lsn_text(rec.prev) if rec.prev else None, end_lsn=lsn_text(end_lsn),
                     xid=xid, time=time.isoformat() if time else None, name=name, rmgr=rec.rmgr,
                     desc=rec.desc[:200])


# ------------------------------------------------------------------------------ locating


@dataclass(frozen=True)
class RestorePointHit:
    lsn: int
    prev: int
    tot_len: int
    name: str
    after_commit: datetime | None   # the last commit before it (pg_waldump does not print a restore point's time)

    def to_dict(self, timeline: int) -> dict[str, Any]:
        return {"lsn": str(Lsn(self.lsn)), "timeline": timeline,
                "after_commit_at": self.after_commit.isoformat() if self.after_commit else None}


class Locator:
    """Reads `locate`-mode lines (commits, aborts, restore points) once, for every target kind.

    * `first_commit_after(t, inclusive)`: PostgreSQL's time rule (the first commit/abort
      record in WAL order whose time is after t, or at/after t when exclusive), found in one
      pass: the first qualifying record after `from_lsn` is remembered as the lines stream.
    * restore points named `name`, with the time of the last commit before each.
    Records at or before the last LSN seen are skipped (runs overlap by one segment).
    """

    def __init__(self, *, from_lsn: int = 0, time: datetime | None = None, inclusive: bool = True,
                 name: str | None = None) -> None:
        self.from_lsn = from_lsn
        self.time = time
        self.inclusive = inclusive
        self.name = name
        self.last_lsn = -1
        self.time_stop: WalRecord | None = None
        self.last_commit: tuple[int, datetime] | None = None
        self.last_commit_before_stop: tuple[int, datetime] | None = None
        self.points: list[RestorePointHit] = []
        self.commits = 0
        self._pending: WalRecord | None = None
        self._pending_lines: list[str] = []

    def feed_line(self, line: str) -> None:
        rec = parse_record(line)
        if rec is None:
            if self._pending is not None and not line.startswith(("rmgr: ", "AGG ", "first record is after")):
                self._pending_lines.append(line)  # a restore point's name spans lines
            return
        self._flush()
        if rec.lsn <= self.last_lsn:
            return
        self.last_lsn = rec.lsn
        self.feed(rec)

    def finish(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if self._pending is None:
            return
        rec, extra = self._pending, self._pending_lines
        self._pending, self._pending_lines = None, []
        name = rec.desc[len("RESTORE_POINT "):] + "".join("\n" + x for x in extra)
        if self.name is not None and name == self.name and rec.lsn >= self.from_lsn:
            after = self.last_commit[1] if self.last_commit else None
            self.points.append(RestorePointHit(rec.lsn, rec.prev, rec.tot_len, name, after))

    def feed(self, rec: WalRecord) -> None:
        if rec.rmgr == "XLOG" and rec.desc.startswith("RESTORE_POINT "):
            self._pending = rec
            return
        if rec.rmgr != "Transaction":
            return
        end = parse_xact_end(rec.desc)
        if end is None:
            return
        self.commits += 1
        if self.time is not None and self.time_stop is None and rec.lsn >= self.from_lsn:
            hit = end.time > self.time if self.inclusive else end.time >= self.time
            if hit:
                self.time_stop = rec
                self.last_commit_before_stop = self.last_commit
        if end.committed:
            self.last_commit = (rec.lsn, end.time)


class XidLocator:
    """Reads `xid`-mode lines: transaction X's COMMIT or ABORT record (or the COMMIT naming X a subtransaction)."""

    def __init__(self, xid: int) -> None:
        self.xid = xid
        self.end: WalRecord | None = None
        self.committed: bool | None = None
        self.parent_of_sub: int | None = None
        self.last_lsn = -1

    def feed_line(self, line: str) -> None:
        rec = parse_record(line)
        if rec is None or rec.rmgr != "Transaction" or rec.lsn <= self.last_lsn or self.end is not None:
            return
        self.last_lsn = rec.lsn
        end = parse_xact_end(rec.desc)
        if end is None:
            return
        top = end.twophase_xid or rec.tx
        if top == self.xid:
            self.end, self.committed = rec, end.committed
        elif self.xid in end.subxacts:
            self.parent_of_sub = top


# ------------------------------------------------------------------------------ backups


def ended_before_stop(b: BackupInfo, stop: StopPoint | None, target_time: datetime | None = None) -> bool:
    """A backup recovery can reach consistency from before the stop record (and that Barman accepts for a time)."""
    if target_time is not None and (b.end_time is None or b.end_time > target_time):
        return False
    if stop is None or stop.kind == "consistency":
        return True
    return b.end_lsn is not None and b.end_lsn.value <= Lsn.parse(stop.lsn).value


def choose_backup(backups: Sequence[BackupInfo], stop: StopPoint | None, *, switches: Sequence[tuple[int, str]],
                  timeline: int, explicit: str | None = None, target_time: datetime | None = None) -> BackupInfo:
    """`backup_id: auto` for every target kind: the newest DONE backup on the path that ended before the stop.

    Only the WAL after that backup is replayed. `stop` None means `immediate` (the newest
    backup on the path). An explicit backup must satisfy the same rule, or it is refused.
    For a time target the backup must also have ended before the target time: Barman
    refuses `--target-time` before a backup's end time, whatever the WAL says.
    """
    done = [b for b in backups if b.status == "DONE"]
    usable = [b for b in done if on_path(b, switches, timeline)]

    def ended_before(b: BackupInfo) -> bool:
        return ended_before_stop(b, stop, target_time)

    if explicit and explicit != "auto":
        pick = next((b for b in done if b.backup_id == explicit), None)
        if pick is None:
            raise ValidationError("backup_id", explicit, "no DONE backup with that id; available: "
                                  + ", ".join(b.backup_id for b in done))
        if pick not in usable:
            raise ValidationError("backup_id", explicit,
                                  f"is on timeline {pick.timeline} at LSN {pick.begin_lsn}, which is not on the history "
                                  f"of timeline {timeline} the recovery follows (an abandoned branch): use backup_id "
                                  f"auto or one of {', '.join(b.backup_id for b in usable) or '(none)'}")
        if not ended_before(pick):
            raise ValidationError("backup_id", explicit,
                                  f"ended at LSN {pick.end_lsn}, after the resolved stop point "
                                  f"({stop.describe() if stop else ''}): recovery could not reach a consistent state "
                                  "before it. Use backup_id auto or an older backup")
        return pick
    fit = [b for b in usable if ended_before(b)]
    if not fit:
        raise PreflightError(
            "no DONE backup on the recovery's timeline path ended before the resolved stop point "
            f"({stop.describe() if stop else 'immediate'}): the target is older than every usable backup. "
            f"Backups: {', '.join(f'{b.backup_id} (timeline {b.timeline}, ends {b.end_lsn})' for b in done) or 'none'}")
    return max(fit, key=lambda b: (b.end_lsn.value if b.end_lsn else 0, b.backup_id))


# ------------------------------------------------------------------------------ what a PITR discards


def subtract_xids(ranges: Iterable[Sequence[int]], xids: Iterable[int]) -> list[list[int]]:
    """Ranges without the given xids (dr_salvage leaves the incident's own rows out)."""
    drop = set(xids)
    out: list[list[int]] = []
    for lo, hi in ranges:
        inner = sorted(x for x in drop if lo <= x <= hi)
        if not inner:
            out.append([lo, hi])
            continue
        start = lo
        for x in inner:
            if x > start:
                out.append([start, x - 1])
            start = x + 1
        if start <= hi:
            out.append([start, hi])
    return out


def xid_ranges(xids: Iterable[int]) -> list[list[int]]:
    """Sorted xids folded into inclusive [first, last] ranges (a busy app's xids are mostly consecutive)."""
    out: list[list[int]] = []
    for x in sorted(set(xids)):
        if out and x == out[-1][1] + 1:
            out[-1][1] = x
        else:
            out.append([x, x])
    return out


@dataclass
class DiscardTally:
    """Every transaction committed at or after `from_lsn` (and before `until_lsn`): what a PITR throws away.

    Fed by `TxnAggregator(on_commit=...)` in `discard` mode. Keeps totals per relation
    file, the first/last commit, the xids (with their subtransactions: rows carry those as
    xmin, which is how dr_salvage finds them), and the largest few transactions. A
    transaction already running where the decode began may have rows before it: listed in
    `began_before_decode` (its counts are a lower bound).
    """

    from_lsn: int
    until_lsn: int | None = None
    decode_start_lsn: int = 0
    #: the transaction the recovery stops right before (the incident, for an exclusive xid target)
    stop_xid: int | None = None
    stop_subxacts: list[int] = field(default_factory=list)
    updated_not_hot: dict[RelFileNode, int] = field(default_factory=dict)
    transactions: int = 0
    with_changes: int = 0
    first_commit: datetime | None = None
    last_commit: datetime | None = None
    per_rel: dict[RelFileNode, list[int]] = field(default_factory=dict)  # inserted, updated, deleted
    xids: set[int] = field(default_factory=set)
    whole_relation: list[dict[str, Any]] = field(default_factory=list)
    top: list[tuple[int, int, str, str]] = field(default_factory=list)  # (-rows, xid, time, lsn)
    running_at_start: set[int] | None = None
    began_before_decode: set[int] = field(default_factory=set)

    def on_record(self, rec: WalRecord) -> None:
        """The first RUNNING_XACTS record of the decode says which transactions began before it."""
        if self.running_at_start is None and rec.rmgr == "Standby" and rec.op == "RUNNING_XACTS":
            # `nextXid 763 latestCompletedXid 761 oldestRunningXid 762; 1 xacts: 762; 0 subxacts: ...`
            _, _, tail = rec.desc.partition(" xacts:")
            self.running_at_start = {int(w) for w in tail.split(";")[0].split() if w.isdigit()}

    def on_commit(self, t: CommittedTxn) -> None:
        if t.commit_lsn < self.from_lsn or (self.until_lsn is not None and t.commit_lsn >= self.until_lsn):
            return
        self.transactions += 1
        if t.xid == self.stop_xid:
            self.stop_subxacts = list(t.subxact_ids)
        self.first_commit = self.first_commit or t.commit_time
        self.last_commit = t.commit_time
        self.xids.add(t.xid)
        self.xids.update(t.subxact_ids)
        rows = 0
        for rel, n in t.inserted.items():
            self.per_rel.setdefault(rel, [0, 0, 0])[0] += n
            rows += n
        for rel, (deleted, updated, hot) in t.counts.items():
            c = self.per_rel.setdefault(rel, [0, 0, 0])
            c[1] += updated + hot
            c[2] += deleted
            if updated:
                # a non-HOT update may have changed the primary key (dr_salvage warns about those tables)
                self.updated_not_hot[rel] = self.updated_not_hot.get(rel, 0) + updated
            rows += deleted + updated + hot
        whole = bool(t.dropped or t.truncated_oids or t.smgr_truncated)
        if whole:
            self.whole_relation.append({"xid": t.xid, "commit_lsn": str(Lsn(t.commit_lsn)),
                                        "truncated": [list(x) for x in t.truncated_oids],
                                        "dropped": [list(x) for x in t.dropped]})
        if rows or whole:
            self.with_changes += 1
            self.top.append((-rows, t.xid, t.commit_time.isoformat(), str(Lsn(t.commit_lsn))))
            if len(self.top) > 4 * TOP_TRANSACTIONS:
                self.top.sort()
                del self.top[TOP_TRANSACTIONS:]
        if self.running_at_start is not None and t.xid in self.running_at_start:
            self.began_before_decode.add(t.xid)

    def relfilenodes(self) -> list[RelFileNode]:
        return sorted(self.per_rel)

    def summary(self, names: dict[RelFileNode, str | None] | None = None) -> dict[str, Any]:
        """The plan's and the report's view: counts, first/last commit, per table, the total, the largest few.

        `names` maps relation files to `schema.table`; None hides a file that is not a user's
        table (TOAST); a file it does not know is shown by number.
        """
        names = names or {}
        tables: dict[str, dict[str, int]] = {}
        for rel, (ins, upd, dele) in sorted(self.per_rel.items()):
            if rel in names and names[rel] is None:
                continue
            label = names.get(rel) or f"relfilenode {rel}"
            t = tables.setdefault(label, {"inserted": 0, "updated": 0, "deleted": 0})
            t["inserted"] += ins
            t["updated"] += upd
            t["deleted"] += dele
        total = {k: sum(t[k] for t in tables.values()) for k in ("inserted", "updated", "deleted")}
        not_hot: dict[str, int] = {}
        for rel, n in self.updated_not_hot.items():
            if not (rel in names and names[rel] is None):
                label = names.get(rel) or f"relfilenode {rel}"
                not_hot[label] = not_hot.get(label, 0) + n
        self.top.sort()
        return {
            "transactions": self.transactions, "transactions_with_changes": self.with_changes,
            "first_commit": self.first_commit.isoformat() if self.first_commit else None,
            "last_commit": self.last_commit.isoformat() if self.last_commit else None,
            "tables": tables, "total": total, "whole_relation": self.whole_relation[:20],
            "largest": [{"xid": x, "rows": -r, "commit_time": tm, "commit_lsn": lsn}
                        for r, x, tm, lsn in self.top[:TOP_TRANSACTIONS]],
            "xid_ranges": xid_ranges(self.xids),
            "began_before_decode": sorted(self.began_before_decode),
            "updated_not_hot": not_hot,
            "stop_transaction": ({"xid": self.stop_xid, "subxacts": self.stop_subxacts}
                                 if self.stop_xid is not None else None),
            "from_lsn": str(Lsn(self.from_lsn)), "until_lsn": lsn_text(self.until_lsn),
            "decoded_from_lsn": str(Lsn(self.decode_start_lsn)),
        }


# ------------------------------------------------------------------------------ the result


@dataclass
class Resolution:
    """A target resolved in the WAL: what the restore asks Barman for and what the proof checks (JSON via to_dict)."""

    requested: RecoveryTarget
    stop: StopPoint
    restore_target: RecoveryTarget
    recovery_timeline: int
    backup: BackupInfo
    occurrences: list[dict[str, Any]] = field(default_factory=list)
    discarded: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    decoded: list[dict[str, Any]] = field(default_factory=list)
    resolved_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    newest_wal: str | None = None
    #: the newest DONE backup Barman holds, and the backups read (newest first) to choose
    newest_backup: str | None = None
    backups_read: list[str] = field(default_factory=list)

    @property
    def replay_bytes(self) -> int:
        begin = self.backup.begin_lsn.value if self.backup.begin_lsn else 0
        return max(Lsn.parse(self.stop.lsn).value - begin, 0)

    @property
    def replay_segments(self) -> int:
        if not self.backup.begin_lsn:
            return 0
        return Lsn.parse(self.stop.lsn).value // WAL_SEGMENT_BYTES - self.backup.begin_lsn.value // WAL_SEGMENT_BYTES + 1

    def to_dict(self) -> dict[str, Any]:
        b = self.backup
        return {
            "requested": self.requested.to_dict(), "stop": self.stop.to_dict(),
            "restore_target": self.restore_target.to_dict(), "recovery_timeline": self.recovery_timeline,
            "backup_id": b.backup_id, "backup": b.to_dict(),
            "replay": {"from_lsn": str(b.begin_lsn) if b.begin_lsn else None, "to_lsn": self.stop.lsn,
                       "bytes": self.replay_bytes, "segments": self.replay_segments,
                       "first_wal": b.begin_wal,
                       "last_wal": WalSegment.from_lsn(self.stop.timeline, Lsn.parse(self.stop.lsn)).name},
            "occurrences": self.occurrences, "discarded": self.discarded, "warnings": self.warnings,
            "decoded": self.decoded, "resolved_at": self.resolved_at, "newest_wal": self.newest_wal,
            "newest_backup": self.newest_backup, "backups_read": self.backups_read,
        }


def restore_target_for(requested: RecoveryTarget, stop: StopPoint) -> RecoveryTarget:
    """What Barman is asked for: the request itself, except a restore point, which becomes its exact LSN.

    Recovering to the chosen occurrence's LSN (inclusive: stop after that record) stops
    exactly where `recovery_target_name` would stop at that occurrence, but cannot stop at
    an earlier occurrence of the same name. Barman writes `recovery_target_name = '%s'`
    without escaping: a name with a quote would also break the restored configuration.
    """
    if requested.kind == "name":
        return RecoveryTarget("lsn", stop.lsn, True)
    if requested.kind == "xid":
        # PostgreSQL keeps 32 bits of recovery_target_xid and logs them: an epoch-qualified xid
        # (pg_current_xact_id()) is passed and proven as those 32 bits
        return RecoveryTarget("xid", str(int(str(requested.value)) & 0xFFFFFFFF), requested.inclusive)
    return requested


def occurrence_choice_error(name: str, hits: Sequence[RestorePointHit], timeline_of: Any) -> ValidationError:
    listing = "; ".join(f"LSN {Lsn(h.lsn)} (timeline {timeline_of(h.lsn)}, after the commit at "
                        f"{h.after_commit.isoformat() if h.after_commit else 'unknown'})" for h in hits)
    return ValidationError("target_name", name,
                           f"was created {len(hits)} times in the WAL Barman holds: {listing}. PostgreSQL stops at the "
                           "first one it meets, which depends on the backup. Say which one: trigger again with "
                           "target_name_lsn set to one of these LSNs (nothing was touched)")
