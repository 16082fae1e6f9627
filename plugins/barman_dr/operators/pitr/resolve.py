"""Resolve the target in the WAL Barman holds, before anything moves: the exact stop record, the backup, the discards.

`TargetResolver` is the I/O half of `barman_dr.forensics.target_resolution` (the pure half mirrors
PostgreSQL's stop rules). It runs pg_waldump on the barman host (`WalDecodeHook`) along the
timeline the recovery will follow: the damaged server's current timeline and its history
back to the backups. Cheap, filtered passes find the stop record (commits and restore
points: about 1.5 GB of WAL per second here; an xid is searched newest first, chunk by
chunk), then one full pass from the stop record to the newest WAL counts what the PITR
would throw away. Shared by dr_pitr (`ResolveTargetOperator`), dr_surgical_recovery and
the monthly drill.

The newest WAL is made archivable first, as the WAL coverage step always did: one empty
commit on the damaged server (a commit record after any past target) and
`switch-wal --force --archive`; the coverage step reuses that switch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from barman_dr.exceptions import BarmanCommandError, BarmanDrError, PreflightError, RemoteCommandError, ValidationError
from barman_dr.forensics.find_target import DATABASES_SQL, Catalog, catalog_sql, parse_catalog_result
from barman_dr.forensics.recovery_proof import TargetProof, prove_target
from barman_dr.forensics.target_resolution import (
    DiscardTally,
    Locator,
    Resolution,
    StopPoint,
    XidLocator,
    choose_backup,
    ended_before_stop,
    lsn_text,
    occurrence_choice_error,
    on_path,
    restore_target_for,
    stop_from_record,
    timeline_of_lsn,
    xid_in_future,
)
from barman_dr.forensics.wal_selection import segment_archived_before, select_range
from barman_dr.forensics.waldump import RelFileNode, TxnAggregator, WalRecord, parse_record, record_end
from barman_dr.forensics.walswitch import nudging
from barman_dr.hooks.waldecode import ArchiveView, WalDecodeHook
from barman_dr.models import BackupInfo, Lsn, RecoveryTarget, WalSegment, is_wal_segment_name
from barman_dr.operators.base import DrBaseOperator
from barman_dr.operators.pitr.delayed import choose_source, pause_delayed_replay, source_intents

SEGMENT = 16 * 1024 * 1024


@dataclass
class SwitchResult:
    """The damaged server's state when the WAL was switched: up or not, the segment closed, its xid and WAL position."""

    primary_up: bool
    closed_wal: str | None = None
    current_wal: str | None = None
    next_xid: int | None = None
    insert_lsn: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def primary_up(op: DrBaseOperator, srv: Any) -> bool:
    db = op.db(srv.primary.host)
    return db.status(srv.primary.data_directory) == "running" and db.is_ready(srv.primary)


def current_timeline(op: DrBaseOperator, srv: Any, up: bool) -> int | None:
    """The damaged server's own timeline (its WAL, or its control file when it is down).

    Not "the timeline of the highest segment Barman holds": after a dr_pitr_rollback the
    abandoned branch can hold higher segment numbers than the timeline the server is on.
    """
    db = op.db(srv.primary.host)
    try:
        if up:
            return int(db.psql(srv.primary, "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)"), 16)
        return db.controldata(srv.primary.data_directory).timeline
    except (BarmanDrError, ValueError):
        return None


def archive_gap(server: str, view: ArchiveView, sw: SwitchResult) -> str | None:
    """"WAL missing" when the running server writes a segment far past the newest Barman holds (the seed's gap).

    `current_wal` is the segment the server wrote when the resolution began, and the WAL
    switch closes it: when the switch reached Barman, Barman holds it. When it did not
    (the switch timed out), every segment from Barman's newest up to it is missing, and a
    target in that stretch can be neither resolved nor reached. A `.partial` in the
    streaming directory does not count: receive-wal may be running while nothing archives
    (`barman cron` stopped), and `barman recover` does not read the streaming directory.
    """
    if not (sw.primary_up and sw.current_wal):
        return None
    current = WalSegment.parse(sw.current_wal)
    newest = WalSegment(view.timeline, view.newest_segno).name if view.newest_segno is not None else "nothing"
    if current.timeline == view.timeline and any(
            segno >= current.segno and not f.partial for segno, f in view.files.files.items()):
        return None  # Barman holds it whole after all (it arrived after the switch timed out)
    if sw.error:  # the server is up and its newest WAL could not be archived: it is missing, whatever else is
        how = f"the WAL switch of {sw.current_wal} never reached Barman (switch-wal --archive: {sw.error})"
    else:
        missing = current.segno - (view.newest_segno if view.newest_segno is not None else -1) - 1
        if current.timeline != view.timeline or missing <= 0:
            return None
        how = f"{missing} segment(s) before {sw.current_wal} never reached Barman"
    return (f"WAL missing: Barman's archive of {server} ends at {newest} while the server writes {sw.current_wal}: "
            f"{how}. WAL streaming or archiving is stopped or lagging, the gap the seed recovery fell into. Nothing "
            "was touched. Fix: restart it (`barman receive-wal`, `barman cron`; dr_daily_verification shows the "
            "state), then trigger again")


def switch_now(op: DrBaseOperator, srv: Any) -> SwitchResult:
    """One empty commit on the damaged server, then `switch-wal --force --archive` (nudged): the newest WAL archived."""
    primary = srv.primary
    db = op.db(primary.host)
    if not primary_up(op, srv):
        return SwitchResult(False)
    # a commit record later than any past target; its xid bounds every xid that exists
    xid = db.psql(primary, "SELECT pg_current_xact_id()", database=srv.database)
    current = db.psql(primary, "SELECT pg_walfile_name(pg_current_wal_lsn()) || ' ' || pg_current_wal_lsn()")
    current_wal, _, insert_lsn = current.partition(" ")
    out = SwitchResult(True, None, current_wal, int(xid) + 1 if xid.isdigit() else None, insert_lsn or None)
    try:
        with nudging(lambda: db.psql(primary, "SELECT pg_current_xact_id()", database=srv.database)):
            out.closed_wal = op.barman.switch_wal(srv.name, archive_timeout=srv.switch_wal_timeout_seconds)
    except BarmanCommandError as exc:
        out.error = str(exc).splitlines()[-1] if str(exc) else "switch-wal failed"
    return out


def name_relations(op: DrBaseOperator, srv: Any, rels: list[RelFileNode], up: bool,
                   instance: Any = None) -> tuple[dict[RelFileNode, str | None], str | None]:
    """`schema.table` for relation files, from the damaged server's live catalogue (nothing when it is down).

    None for a file that is not a user's table (TOAST, a catalogue rewritten since): its rows
    are not rows anyone wrote, so the plan does not list them.
    """
    if not rels:
        return {}, None
    if not up:
        return {}, "the primary is down: tables are shown as relation files"
    inst = instance or srv.primary
    db = op.db(inst.host)
    cat = Catalog()
    try:
        cat.databases = {int(k): v for k, v in json.loads(db.psql(inst, DATABASES_SQL,
                                                                  database=srv.database)).items()}
        by_db: dict[int, set[tuple[int, int]]] = {}
        for r in rels:
            by_db.setdefault(r.db, set()).add((r.spc, r.fn))
        for dboid, pairs in sorted(by_db.items()):
            name = cat.databases.get(dboid)
            if name is None:
                continue
            parse_catalog_result(cat, dboid, db.psql(inst, catalog_sql(pairs, (), None), database=name,
                                                     timeout=120))
    except (RemoteCommandError, ValueError) as exc:
        return {}, f"catalogue query failed: {str(exc).splitlines()[0][:200]}"
    out: dict[RelFileNode, str | None] = {}
    for r in rels:
        info = cat.filenodes.get((r.db, r.spc, r.fn))
        if info is None:
            continue
        if not info.is_user_table:
            out[r] = None
            continue
        dbname = cat.databases.get(r.db)
        out[r] = info.qualified if dbname in (None, srv.database) else f"{dbname}:{info.qualified}"
    return out, None


class TargetResolver:
    """Resolve one server's recovery target in the WAL its barman host holds (see the module docstring)."""

    def __init__(self, op: DrBaseOperator, srv: Any, *, margin_s: float = 300, xid_chunk: int = 64,
                 chunk: int = 256) -> None:
        self.op = op
        self.srv = srv
        self.margin_s = margin_s
        self.xid_chunk = xid_chunk
        self.chunk = chunk
        self.decoder = WalDecodeHook(barman=op.barman)
        self.decoded: list[dict[str, Any]] = []
        self.warnings: list[str] = []
        self._infos: dict[str, BackupInfo] = {}

    # -------------------------------------------------------------------------- helpers
    def _decode(self, view: ArchiveView, waldump: str, first: int, last: int | None, on_line: Any, mode: str,
                arg: str = "", chunk: int | None = None) -> None:
        sel = select_range(view.files, first, last, chunk or self.chunk)
        if sel.gaps:
            self.warnings.append(f"{len(sel.gaps)} WAL segment(s) missing from Barman's archive between "
                                 f"{WalSegment(view.timeline, first).name} and the newest (e.g. {', '.join(sel.gaps[:3])})")
        self.decoded += self.decoder.decode(sel.runs, waldump, on_line, mode=mode, arg=arg)

    def _backup(self, backup_id: str) -> BackupInfo:
        if backup_id not in self._infos:
            self._infos[backup_id] = self.op.barman.show_backup(self.srv.name, backup_id)
        return self._infos[backup_id]

    def _choose(self, ids: list[str], stop: StopPoint | None, view: ArchiveView, explicit: str,
                target_time: datetime | None) -> BackupInfo:
        """The newest fitting backup, reading `show-backup` newest first and stopping at the first that fits.

        Most incidents are recent: the newest backup fits, and the cost does not grow with the
        number of backups kept. Only when none fits are all read (for the refusal's list).
        """
        if explicit and explicit != "auto":
            pick = [self._backup(explicit)] if explicit in ids else []
            return choose_backup(pick or [self._backup(i) for i in ids], stop, switches=view.switches,
                                 timeline=view.timeline, explicit=explicit, target_time=target_time)
        for backup_id in ids:  # newest first
            b = self._backup(backup_id)
            if b.status == "DONE" and on_path(b, view.switches, view.timeline) and \
                    ended_before_stop(b, stop, target_time):
                return b
        return choose_backup([self._backup(i) for i in ids], stop, switches=view.switches, timeline=view.timeline,
                             target_time=target_time)

    def _oldest_usable(self, ids: list[str], view: ArchiveView) -> BackupInfo | None:
        for backup_id in reversed(ids):  # oldest first
            b = self._backup(backup_id)
            if on_path(b, view.switches, view.timeline):
                return b
        return None

    # -------------------------------------------------------------------------- kinds
    def _time(self, view: ArchiveView, waldump: str, t: datetime, inclusive: bool, floor: int) -> tuple[StopPoint, Locator]:
        start = segment_archived_before(view.files, t, self.margin_s)
        first = max(start if start is not None else floor, floor)
        loc = Locator(from_lsn=first * SEGMENT, time=t, inclusive=inclusive)
        self._decode(view, waldump, first, None, loc.feed_line, "locate")
        loc.finish()
        if loc.time_stop is None:
            newest = loc.last_commit[1].isoformat() if loc.last_commit else "none decoded"
            raise ValidationError("target_time", t.isoformat(),
                                  f"no transaction committed after it in the WAL Barman holds (newest commit: {newest}): "
                                  "recovery could not stop at it (PostgreSQL fails 'before the target was reached'). "
                                  "Start the server so barman-dr can archive a commit after the target, or choose an "
                                  "earlier target. Nothing was touched")
        rec = loc.time_stop
        return stop_from_record(rec, "before", timeline_of_lsn(rec.lsn, view.switches, view.timeline)), loc

    def _xid(self, view: ArchiveView, waldump: str, xid: int, inclusive: bool, floor: int,
             next_xid: int | None) -> StopPoint:
        x32 = xid & 0xFFFFFFFF
        if next_xid is not None and xid_in_future(xid, next_xid):
            raise ValidationError("target_xid", str(xid),
                                  f"has not been assigned yet (the server's next transaction id is {next_xid}): it is in "
                                  "the future. Check the xid (dr_find_target lists the bad transactions). Nothing was "
                                  "touched")
        newest = view.newest_segno
        if newest is None:
            raise PreflightError(f"Barman holds no WAL for {self.srv.name} on timeline {view.timeline}'s history")
        loc = XidLocator(x32)
        hi = newest
        while hi >= floor and loc.end is None:
            lo = max(floor, hi - self.xid_chunk + 1)
            self._decode(view, waldump, max(floor, lo - 1), hi, loc.feed_line, "xid", str(x32))
            hi = lo - 1
        if loc.end is None:
            if loc.parent_of_sub is not None:
                raise ValidationError("target_xid", str(xid),
                                      f"is a subtransaction of transaction {loc.parent_of_sub}: recovery targets stop at "
                                      f"top-level transactions only. Use target_xid {loc.parent_of_sub}")
            raise ValidationError("target_xid", str(xid),
                                  f"no COMMIT or ABORT of this transaction in the WAL Barman holds for {self.srv.name} "
                                  f"(from {WalSegment(view.timeline, floor).name} to the newest): it is unknown, still "
                                  "running, or older than every backup. Check the xid (dr_find_target lists the bad "
                                  "transactions). Nothing was touched")
        if not loc.committed:
            raise ValidationError("target_xid", str(xid),
                                  f"was ABORTED (at LSN {Lsn(loc.end.lsn)}): it changed nothing, so there is nothing to "
                                  "recover from it. Check the xid (dr_find_target lists committed transactions). Nothing "
                                  "was touched")
        rec = loc.end
        return stop_from_record(rec, "after" if inclusive else "before",
                                timeline_of_lsn(rec.lsn, view.switches, view.timeline))

    def _lsn(self, view: ArchiveView, waldump: str, lsn: int, inclusive: bool, switch: Any) -> StopPoint:
        tli = timeline_of_lsn(lsn, view.switches, view.timeline)
        limit = Lsn.parse(switch.insert_lsn).value if switch.insert_lsn else None
        if limit is not None and lsn > limit:
            raise ValidationError("target_lsn", str(Lsn(lsn)),
                                  f"is in the future: the server has written WAL only up to {switch.insert_lsn}. "
                                  "Nothing was touched")
        seg = lsn // SEGMENT
        found: list[WalRecord] = []

        def take(line: str) -> None:
            rec = parse_record(line)
            if rec is not None and not found:
                found.append(rec)

        if seg in view.files.files:
            # the record may start in the next segment (L at a segment's end) or continue into it: one run
            sel = select_range(view.files, seg, min(seg + 2, view.newest_segno or seg), self.chunk)
            self.decoded += self.decoder.decode(sel.runs[:1], waldump, take, mode="one", arg=str(Lsn(lsn)))
            if not found and seg + 1 in view.files.files:
                # L in the zeroed tail of a switched-out segment (what pg_switch_wal() returns): recovery goes on
                # with the first record of the next segment
                sel = select_range(view.files, seg + 1, min(seg + 2, view.newest_segno or seg), self.chunk)
                self.decoded += self.decoder.decode(sel.runs[:1], waldump, take, mode="one",
                                                    arg=str(Lsn((seg + 1) * SEGMENT)))
        if not found:
            raise ValidationError("target_lsn", str(Lsn(lsn)),
                                  f"no WAL record at or after it in the WAL Barman holds (timeline {tli}, segment "
                                  f"{WalSegment(tli, seg).name}{' missing' if seg not in view.files.files else ''}): "
                                  "it is beyond the archived WAL or before it. Nothing was touched")
        rec = found[0]
        # kind "record": PostgreSQL logs an LSN stop as "... WAL location (LSN)", even on a COMMIT record
        return stop_from_record(rec, "after" if inclusive else "before",
                                timeline_of_lsn(rec.lsn, view.switches, view.timeline), kind="record")

    def _name(self, view: ArchiveView, waldump: str, name: str, chosen: str | None, floor: int,
              reachable_from: int) -> tuple[StopPoint, list[dict[str, Any]]]:
        loc = Locator(from_lsn=floor * SEGMENT, name=name)
        self._decode(view, waldump, floor, None, loc.feed_line, "locate")
        loc.finish()
        reachable = [h for h in loc.points if h.lsn >= reachable_from]
        unreachable = [h for h in loc.points if h.lsn < reachable_from]
        if unreachable:
            self.warnings.append(f"{len(unreachable)} older occurrence(s) of restore point {name!r} lie before the end of "
                                 f"every usable backup (e.g. LSN {Lsn(unreachable[0].lsn)}): no recovery can stop there")

        def tl(lsn: int) -> int:
            return timeline_of_lsn(lsn, view.switches, view.timeline)

        if not reachable:
            raise ValidationError("target_name", name,
                                  f"no restore point with this exact name in the WAL Barman holds for {self.srv.name} "
                                  f"after the end of its oldest usable backup ({loc.commits} commits decoded). Names are "
                                  "case- and space-sensitive: check it (pg_create_restore_point's argument). Nothing was "
                                  "touched")
        if chosen is not None:
            # the record's start (what the plan lists) or its end (what pg_create_restore_point() returned)
            pick = [h for h in reachable if chosen in (str(Lsn(h.lsn)), str(Lsn(record_end(h.lsn, h.tot_len))))]
            if not pick:
                raise ValidationError("target_name_lsn", chosen,
                                      f"is not the LSN of an occurrence of restore point {name!r}; its occurrences: "
                                      + ", ".join(str(Lsn(h.lsn)) for h in reachable) + ". Nothing was touched")
            hit = pick[0]
        elif len(reachable) > 1:
            raise occurrence_choice_error(name, reachable, tl)
        else:
            hit = reachable[0]
        occurrences = [{**h.to_dict(tl(h.lsn)), "chosen": h is hit, "occurrence": i}
                       for i, h in enumerate(reachable, 1)]
        stop = StopPoint(kind="restore_point", when="after", lsn=str(Lsn(hit.lsn)), timeline=tl(hit.lsn),
                         prev_lsn=str(Lsn(hit.prev)) if hit.prev else None,
                         end_lsn=lsn_text(record_end(hit.lsn, hit.tot_len)) if hit.tot_len else None,
                         time=hit.after_commit.isoformat() if hit.after_commit else None, name=name, rmgr="XLOG",
                         desc="RESTORE_POINT")
        return stop, occurrences

    # -------------------------------------------------------------------------- all together
    def resolve(self, target: RecoveryTarget, *, backup_id: str = "auto", name_lsn: str | None = None,
                switch: bool = True, discard: bool = True, switched: SwitchResult | None = None) -> Resolution:
        """The target resolved: stop record, backup, what Barman is asked for, and (with `discard`) what is given up."""
        srv, barman = self.srv, self.op.barman
        self.warnings, self.decoded = [], []
        sw = switched or (switch_now(self.op, srv) if switch else SwitchResult(primary_up(self.op, srv)))
        if sw.error:
            self.warnings.append(f"switch-wal --archive failed ({sw.error}): the newest WAL is read from the streaming "
                                 "directory")
        info = barman.show_server(srv.name)
        waldump = self.decoder.waldump(info, srv.name, self.warnings)
        catalog = barman.wal_catalog(srv.name)
        names = [e.name for e in catalog if is_wal_segment_name(e.name)]
        anchor = sw.closed_wal or sw.current_wal
        if anchor is not None:
            tli = WalSegment.parse(anchor).timeline
        else:
            tli = current_timeline(self.op, srv, sw.primary_up) or (
                max(WalSegment.parse(n).timeline for n in names) if names else None)
        if tli is None:
            raise PreflightError(f"Barman holds no WAL for {srv.name}: nothing to recover along")
        view = self.decoder.view(srv.name, info, tli, catalog=catalog)
        self._infos = {}
        ids = [b.backup_id for b in sorted((b for b in barman.list_backups(srv.name) if b.is_done),
                                           key=lambda b: b.backup_id, reverse=True)]
        if not ids:
            raise PreflightError(f"Barman has no DONE backup of {srv.name}: nothing to recover from")
        oldest = self._oldest_usable(ids, view)
        if oldest is None or not view.files.files:
            raise PreflightError(f"no DONE backup of {srv.name} lies on the history of timeline {view.timeline}: "
                                 "nothing can recover along it. Take a backup (dr_weekly_full_backup)")
        # Barman keeps WAL from the oldest backup's begin on: the decode never needs to start earlier
        floor = max(min(view.files.files), (oldest.begin_lsn.value if oldest.begin_lsn else 0) // SEGMENT)
        reachable_from = oldest.end_lsn.value if oldest.end_lsn else 0
        occurrences: list[dict[str, Any]] = []
        if target.kind == "immediate":
            backup = self._choose(ids, None, view, backup_id, None)
            stop = StopPoint(kind="consistency", when="after", lsn=str(backup.end_lsn), timeline=backup.timeline,
                             prev_lsn=str(backup.begin_lsn) if backup.begin_lsn else None)
        else:
            try:
                if target.kind == "time":
                    stop, _ = self._time(view, waldump, datetime.fromisoformat(str(target.value)), target.inclusive,
                                         floor)
                elif target.kind == "xid":
                    stop = self._xid(view, waldump, int(str(target.value)), target.inclusive, floor, sw.next_xid)
                elif target.kind == "lsn":
                    stop = self._lsn(view, waldump, Lsn.parse(str(target.value)).value, target.inclusive, sw)
                else:
                    stop, occurrences = self._name(view, waldump, str(target.value), name_lsn, floor, reachable_from)
            except ValidationError as exc:
                gap = archive_gap(srv.name, view, sw)
                if gap:  # the target may be fine: the WAL that would show it never reached Barman
                    raise PreflightError(f"{gap} (resolving the target: {exc})") from exc
                raise
            backup = self._choose(ids, stop, view, backup_id, target.time)
        res = Resolution(requested=target, stop=stop, restore_target=restore_target_for(target, stop),
                         recovery_timeline=view.timeline, backup=backup, occurrences=occurrences,
                         newest_wal=WalSegment(view.timeline, view.newest_segno).name if view.newest_segno else None,
                         newest_backup=ids[0], backups_read=list(self._infos))
        if discard:
            res.discarded = self.discards(view, waldump, stop, sw.primary_up)
        res.warnings, res.decoded = list(self.warnings), list(self.decoded)
        return res

    def discards(self, view: ArchiveView, waldump: str, stop: StopPoint, up: bool,
                 until_lsn: int | None = None, instance: Any = None) -> dict[str, Any]:
        """Every transaction committed after the stop point up to the newest WAL (or `until_lsn`), by table."""
        tally = DiscardTally(from_lsn=stop.discard_from, until_lsn=until_lsn,
                             stop_xid=stop.xid if stop.kind in ("commit", "abort") and stop.when == "before" else None)
        start = max(Lsn.parse(stop.lsn).value // SEGMENT - 1, min(view.files.files) if view.files.files else 0)
        tally.decode_start_lsn = start * SEGMENT
        agg = TxnAggregator(lambda _t: False, on_commit=tally.on_commit, on_record=tally.on_record)
        last = until_lsn // SEGMENT if until_lsn is not None else None
        self._decode(view, waldump, start, last, agg.feed_line, "discard")
        names, why = name_relations(self.op, self.srv, tally.relfilenodes(), up, instance)
        out = tally.summary(names)
        if why:
            out["names"] = why
        if out["began_before_decode"]:
            out["partial_counts"] = (f"{len(out['began_before_decode'])} discarded transaction(s) began before "
                                     f"{lsn_text(tally.decode_start_lsn)}: their row counts are a lower bound")
        return out


def resolution_for(op: DrBaseOperator, context: Any) -> dict[str, Any]:
    """The resolve_target XCom of this run (every later step takes the stop point and the backup from it)."""
    res = op.upstream(context, "resolve_target")
    if not isinstance(res, dict) or "stop" not in res:
        raise PreflightError("the resolved target (XCom of resolve_target) is missing: clear the run from resolve_target")
    return res


def refuse_unrecoverable_request(barman: Any, req: Any) -> None:
    """The catalogue half of validation, run where Barman is reachable (resolve_target's worker):
    a named backup must exist, and a time target must not be older than the oldest backup."""
    backups = [b for b in barman.list_backups(req.server) if b.is_done]
    if not backups:
        raise PreflightError(f"Barman has no DONE backup of {req.server}: nothing to recover from")
    if req.backup_id != "auto" and req.backup_id not in {b.backup_id for b in backups}:
        raise ValidationError("backup_id", req.backup_id,
                              f"no DONE backup with that id; available: {', '.join(b.backup_id for b in backups)}")
    t = req.target.time
    oldest = min(backups, key=lambda b: b.end_time or datetime.max.replace(tzinfo=UTC))
    if t is not None and oldest.end_time is not None and t < oldest.end_time:
        raise ValidationError("target_time", req.target.value,
                              f"is before the end of the oldest backup ({oldest.backup_id}, ended "
                              f"{oldest.end_time.isoformat()}): no backup can recover to it")


class ResolveTargetOperator(DrBaseOperator):
    """Step 1b: the target located in the WAL: the exact stop record, the backup, what the PITR discards.

    Refuses, before anything is touched and naming the field, the value and the fix: an xid
    never seen, aborted or not yet assigned; a restore point name not found, or created
    more than once without `target_name_lsn`; a time with no commit after it; an LSN in the
    future or beyond the archive; an explicit backup_id that does not fit the stop point.
    Read-only apart from the WAL switch (the coverage step reuses it).
    """

    action = "resolve_target"

    def __init__(self, *, margin_s: float = 300, xid_chunk_segments: int = 64, discard: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.margin_s = margin_s
        self.xid_chunk_segments = xid_chunk_segments
        self.discard = discard

    def run(self, context: Any) -> dict[str, Any]:
        req = self.req
        refuse_unrecoverable_request(self.barman, req)
        # the request is valid: the delayed standbys stop applying WAL until the run ends (operators/pitr/delayed.py)
        paused = pause_delayed_replay(self, context)
        resolver = TargetResolver(self, self.srv, margin_s=self.margin_s, xid_chunk=self.xid_chunk_segments)
        sw = switch_now(self, self.srv)
        res = resolver.resolve(req.target, backup_id=req.backup_id,
                               name_lsn=getattr(req, "target_name_lsn", None), switched=sw, discard=self.discard)
        out = res.to_dict()
        out["switch"] = sw.to_dict()
        out["delayed_paused"] = paused
        # where the run recovers from (`source`): every later step reads its request through this decision
        out["source"] = self.promoted_already(context) or choose_source(req, self.srv, out["stop"], paused)
        context["ti"].xcom_push(key="source", value=out["source"])
        return out

    def promoted_already(self, context: Any) -> dict[str, Any] | None:
        """A run cleared from here after stage_restore began promoting its delayed standby keeps that source.

        The standby is then stopped or promoted at the stop point (its audited `delayed_source` intent):
        deciding again would find it "not paused" and restore from Barman, leaving it promoted and unmentioned.
        """
        started = source_intents(self, context)
        if not started:
            return None
        name = str(started[0]["target"])
        return {"chosen": "delayed_standby", "restore_to": name, "standby": name, "requested": self.req.source,
                "why": f"this run already stopped or promoted delayed standby {name} at the stop point (audited "
                       "delayed_source intent): it goes on from there"}

    def audit_details(self, result: Any) -> dict[str, Any]:
        if not isinstance(result, dict):
            return {"result": result}
        disc = dict(result.get("discarded") or {})
        disc.pop("xid_ranges", None)  # large; the XCom keeps them
        return {**result, "discarded": disc}

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        if isinstance(exc, ValidationError):
            return "Nothing was touched. Correct the field named above and trigger again."
        if isinstance(exc, BarmanDrError):
            return ("Nothing was touched. Check that Barman holds the WAL (`barman check`, `barman show-server`) and "
                    "that pg_waldump runs on the barman host, then clear this task.")
        return "Nothing was touched."


def restore_target_of(res: dict[str, Any]) -> RecoveryTarget:
    """What `barman restore` is asked for (a restore point becomes its resolved LSN)."""
    t = res["restore_target"]
    return RecoveryTarget(t["kind"], t["value"], bool(t["inclusive"]))


def target_tli_of(res: dict[str, Any]) -> int:
    """`--target-tli`: always the timeline the resolution followed.

    Left to PostgreSQL (`latest`), recovery would follow the newest timeline whose history
    file Barman holds, which after a dr_pitr_rollback is an abandoned branch.
    """
    return int(res["recovery_timeline"])


def prove_resolved(res: dict[str, Any], log_text: str, history_text: str | None, old_timeline: int | None,
                   new_timeline: int | None) -> TargetProof:
    """The recovery proof against the resolved stop point: the exact record, the fork between its neighbours."""
    return prove_target(restore_target_of(res), log_text, history_text, old_timeline, new_timeline,
                        stop_point=res["stop"], recovery_timeline=int(res["recovery_timeline"]))
