"""Prove where recovery stopped, from PostgreSQL's own words.

"PostgreSQL started" is not "the target was reached" (the seed's run started fine and
stopped early). After promotion we read two witnesses and require both to agree with
the requested target:

* the server log of this start: `recovery stopping before commit of transaction N, time T`
  (or `... at restore point "x"`, `... before WAL location (LSN) "X"`, `... after
  reaching consistency`) and `selected new timeline ID: N`;
* the new timeline's history file (`pg_wal/0000000N.history`), whose last line records
  the switch point and the reason (`before transaction 730`, `before 2026-11-25 ...`).

"Stopped at a transaction" is not "stopped at *the* transaction". With the stop point
`target_resolution` found in the WAL before the restore (`stop`), the proof is exact:
the log must name the very record (xid and commit time, or LSN), the history file's
switch LSN must lie between that record's neighbours (a stop one record early or late
forks elsewhere), and the new timeline must branch off the timeline recovery followed.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from barman_dr.models import Lsn, RecoveryTarget

STOP_XACT_RE = re.compile(
    r"recovery stopping (?P<when>before|after) (?P<what>commit|abort) of transaction (?P<xid>\d+), time (?P<time>[0-9:. +-]+)")
STOP_POINT_RE = re.compile(r'recovery stopping at restore point "(?P<name>[^"]*)", time (?P<time>[0-9:. +-]+)')
STOP_LSN_RE = re.compile(r'recovery stopping (?P<when>before|after) WAL location \(LSN\) "(?P<lsn>[0-9A-Fa-f]+/[0-9A-Fa-f]+)"')
STOP_CONSISTENT_RE = re.compile(r"recovery stopping after reaching consistency")
NEW_TLI_RE = re.compile(r"selected new timeline ID: (?P<tli>\d+)")
NOT_REACHED_RE = re.compile(r"recovery ended before configured recovery target was reached")
STARTING_PITR_RE = re.compile(r"starting point-in-time recovery to (?P<target>.+)$", re.M)


def parse_pg_time(text: str) -> datetime:
    """PostgreSQL log times: `2026-11-25 12:59:41.509+00` (offset may lack minutes)."""
    t = text.strip()
    m = re.match(r"^(.*[+-]\d\d)$", t)
    if m:
        t = t + ":00"
    parsed = datetime.fromisoformat(t)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass
class RecoveryStop:
    """What the log says about where recovery stopped."""

    kind: str | None = None            # xact | restore_point | lsn | consistency
    when: str | None = None            # before | after
    xid: int | None = None
    time: str | None = None
    restore_point: str | None = None
    lsn: str | None = None
    new_timeline: int | None = None
    not_reached: bool = False
    lines: list[str] = field(default_factory=list)


def parse_recovery_log(text: str) -> RecoveryStop:
    stop = RecoveryStop()
    for line in text.splitlines():
        if m := STOP_XACT_RE.search(line):
            stop.kind, stop.when, stop.xid = "xact", m.group("when"), int(m.group("xid"))
            stop.time = parse_pg_time(m.group("time")).isoformat()
            stop.lines.append(line.strip())
        elif m := STOP_POINT_RE.search(line):
            stop.kind, stop.restore_point = "restore_point", m.group("name")
            stop.time = parse_pg_time(m.group("time")).isoformat()
            stop.lines.append(line.strip())
        elif m := STOP_LSN_RE.search(line):
            stop.kind, stop.when, stop.lsn = "lsn", m.group("when"), m.group("lsn").upper()
            stop.lines.append(line.strip())
        elif STOP_CONSISTENT_RE.search(line):
            stop.kind = "consistency"
            stop.lines.append(line.strip())
        elif m := NEW_TLI_RE.search(line):
            stop.new_timeline = int(m.group("tli"))
            stop.lines.append(line.strip())
        elif NOT_REACHED_RE.search(line):
            stop.not_reached = True
            stop.lines.append(line.strip())
        elif "starting point-in-time recovery" in line or "archive recovery complete" in line:
            stop.lines.append(line.strip())
    return stop


@dataclass(frozen=True)
class HistoryEntry:
    parent_timeline: int
    switch_lsn: str
    reason: str


def parse_history_file(text: str) -> list[HistoryEntry]:
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            parts = line.split(None, 2)
        out.append(HistoryEntry(int(parts[0]), parts[1].strip(), parts[2].strip() if len(parts) > 2 else ""))
    return out


@dataclass
class TargetProof:
    reached: bool
    reasons: list[str]
    stop: dict[str, Any]
    history_reason: str | None
    old_timeline: int | None
    new_timeline: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _prove_stop_point(point: dict[str, Any], stop: RecoveryStop, history: list[HistoryEntry],
                      recovery_timeline: int | None) -> list[str]:
    """The exact checks against the resolved stop point (`target_resolution.StopPoint.to_dict()`)."""
    problems: list[str] = []
    kind, when = point.get("kind"), point.get("when")
    want_lsn = Lsn.parse(point["lsn"]) if point.get("lsn") else None
    if kind in ("commit", "abort"):
        what = "commit" if kind == "commit" else "abort"
        if stop.kind != "xact" or stop.xid != point.get("xid") or stop.when != when:
            problems.append(f"expected 'recovery stopping {when} {what} of transaction {point.get('xid')}' (the resolved "
                            f"stop record at {point.get('lsn')}), log says {stop.lines[-3:] if stop.lines else 'nothing'}")
        elif point.get("time") and stop.time and \
                datetime.fromisoformat(stop.time) != datetime.fromisoformat(str(point["time"])):
            problems.append(f"recovery stopped at transaction {stop.xid} committed {stop.time}, but the resolved stop "
                            f"record was committed {point['time']}: not the same record")
    elif kind in ("record", "restore_point"):
        if stop.kind != "lsn" or stop.lsn is None or want_lsn is None or Lsn.parse(stop.lsn) != want_lsn \
                or stop.when != when:
            problems.append(f"expected 'recovery stopping {when} WAL location (LSN) \"{point.get('lsn')}\"' (the resolved "
                            f"{'restore point' if kind == 'restore_point' else 'record'}), log says "
                            f"{stop.lines[-3:] if stop.lines else 'nothing'}")
    elif kind == "consistency":
        if stop.kind != "consistency":
            problems.append("expected 'recovery stopping after reaching consistency'")
    switch = Lsn.parse(history[-1].switch_lsn).value if history else None
    rng = point.get("switch_range")
    if history and rng and rng[0] and rng[1]:
        lo, hi = Lsn.parse(rng[0]).value, Lsn.parse(rng[1]).value
        if switch is None or not lo < switch <= hi:
            problems.append(f"the new timeline forks at {history[-1].switch_lsn}, not at the resolved stop point: it must "
                            f"be after {rng[0]} and at most {rng[1]} ({point.get('described') or kind})")
    if history and recovery_timeline is not None:
        parent = history[-1].parent_timeline
        if parent not in (recovery_timeline, point.get("timeline")):
            problems.append(f"the new timeline branches off timeline {parent}, not off timeline {recovery_timeline} "
                            "that the recovery followed")
    return problems


def prove_target(target: RecoveryTarget, log_text: str, history_text: str | None, old_timeline: int | None,
                 new_timeline: int | None, *, stop_point: dict[str, Any] | None = None,
                 recovery_timeline: int | None = None) -> TargetProof:
    """Decide whether recovery stopped exactly where it was asked to (see module docstring).

    `target` is what the restore asked PostgreSQL for; `stop_point` (when the target was
    resolved) is the record it must have stopped at.
    """
    stop = parse_recovery_log(log_text)
    history = parse_history_file(history_text or "")
    reason = history[-1].reason if history else None
    problems: list[str] = []

    if stop.not_reached:
        problems.append("PostgreSQL reports: recovery ended before configured recovery target was reached")
    if new_timeline is None or old_timeline is None or new_timeline <= old_timeline:
        problems.append(f"timeline did not increase (before {old_timeline}, after {new_timeline}): not promoted")
    if stop.new_timeline is not None and new_timeline is not None and stop.new_timeline != new_timeline:
        problems.append(f"log selected timeline {stop.new_timeline} but pg_controldata says {new_timeline}")
    if not history:
        problems.append("no timeline history file for the new timeline")

    if target.kind == "time":
        want = datetime.fromisoformat(str(target.value))
        if stop.kind != "xact" or not stop.time:
            problems.append("the server log has no 'recovery stopping before commit ... time T' line for the time target")
        else:
            got = datetime.fromisoformat(stop.time)
            ok = got > want if target.inclusive else got >= want
            if stop.when != "before" or not ok:
                problems.append(f"recovery stopped {stop.when} a transaction at {got.isoformat()}, which does not "
                                f"follow the target {want.isoformat()}")
        if reason is not None and not reason.startswith("before"):
            problems.append(f"history file reason {reason!r} is not a stop before the target time")
    elif target.kind == "xid":
        want_when = "after" if target.inclusive else "before"
        if stop.kind != "xact" or stop.xid != int(str(target.value)) or stop.when != want_when:
            problems.append(f"expected 'recovery stopping {want_when} commit of transaction {target.value}', "
                            f"log says {stop.lines[-3:] if stop.lines else 'nothing'}")
        if reason is not None and f"transaction {target.value}" not in reason:
            problems.append(f"history file reason {reason!r} does not name transaction {target.value}")
    elif target.kind == "name":
        if stop.kind != "restore_point" or stop.restore_point != target.value:
            problems.append(f"expected 'recovery stopping at restore point \"{target.value}\"'")
    elif target.kind == "lsn":
        # PostgreSQL logs the stop *record's* LSN: the target's when it is a record start (resolved below otherwise)
        if stop.kind != "lsn" or stop.lsn is None or \
                (stop_point is None and Lsn.parse(stop.lsn) != Lsn.parse(str(target.value))):
            problems.append(f"expected 'recovery stopping ... WAL location (LSN) \"{target.value}\"'")
    elif target.kind == "immediate" and stop.kind != "consistency":
        problems.append("expected 'recovery stopping after reaching consistency'")
    if stop_point is not None:
        problems += [p for p in _prove_stop_point(stop_point, stop, history, recovery_timeline) if p not in problems]

    return TargetProof(reached=not problems, reasons=problems or [f"recovery stopped as requested: {stop.lines[:3]}"],
                       stop=asdict(stop), history_reason=reason, old_timeline=old_timeline, new_timeline=new_timeline)
