"""Pure report logic of the scheduled DR DAGs: measurements in, OK / WARNING / CRITICAL out.

No I/O here: the operators (operators/scheduled.py) collect Barman's JSON, the WAL
catalogue, `df -P` and the primary's view, and these functions turn them into a
per-server report with reasons. Keeping the thresholds logic pure lets unit tests
replay recorded Barman output and crafted faults without a lab.

Thresholds come from the inventory (`servers.<name>.verification`):
`max_backup_age_hours`, `max_wal_lag_files`, `max_disk_usage_percent`,
`max_standby_lag_bytes`. Missing keys fall back to DEFAULT_THRESHOLDS.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from barman_dr.hooks.barman import compute_coverage
from barman_dr.models import BackupSummary, CheckReport, WalSegment, is_wal_segment_name

OK, WARNING, CRITICAL = "OK", "WARNING", "CRITICAL"
#: a drill that did not apply to a server (no nonprod target): neither healthy nor failing
SKIPPED = "SKIPPED"
_RANK = {OK: 0, SKIPPED: 0, WARNING: 1, CRITICAL: 2}

DEFAULT_THRESHOLDS: dict[str, float] = {
    "max_backup_age_hours": 170.0,   # weekly full backups: 7 days + 2 h of slack
    "max_wal_lag_files": 10.0,       # the seed's monitoring: > 10 files behind is a WARNING
    "max_disk_usage_percent": 85.0,
    "max_standby_lag_bytes": 16 * 1024 * 1024.0,
}

#: what the on-call DBA should do for a failed `barman check` item (Barman's own hint is often empty)
CHECK_HINTS: dict[str, str] = {
    "receive_wal_running": "WAL streaming is stopped: run `barman cron` on the barman host (it restarts "
                           "`receive-wal`), then `barman check`",
    "replication_slot": "the replication slot is not used by receive-wal: restart WAL streaming with `barman cron` "
                        "(`barman receive-wal --create-slot` if the slot is missing)",
    "postgresql": "Barman cannot connect to PostgreSQL: check the server and Barman's conninfo",
    "postgresql_streaming": "Barman's streaming connection fails: check streaming_conninfo and pg_hba.conf",
    "backup_maximum_age": "no recent backup: run `barman backup` (or dr_weekly_full_backup)",
    "minimum_redundancy_requirements": "fewer backups than minimum_redundancy: take a backup now",
    "failed_backups": "failed backups exist: inspect them (`barman list-backups`) and delete them",
    "archiver_errors": "WAL files were rejected by the archiver: see the errors directory of the server",
    "wal_maximum_age": "no WAL archived recently: check WAL streaming",
}


@dataclass(frozen=True)
class Finding:
    check: str
    status: str
    reason: str
    hint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def worst(statuses: Iterable[str]) -> str:
    out = OK
    for s in statuses:
        if _RANK[s] > _RANK[out]:
            out = s
    return out


def thresholds_for(verification: Mapping[str, float] | None) -> dict[str, float]:
    return {**DEFAULT_THRESHOLDS, **{k: float(v) for k, v in (verification or {}).items()}}


# ------------------------------------------------------------------------------------ single checks


def check_findings(report: CheckReport) -> list[Finding]:
    """Every failed `barman check` item is CRITICAL, named with Barman's hint and ours."""
    out = []
    for c in report.failed:
        ours = CHECK_HINTS.get(c.name)
        hint = "; ".join(h for h in (c.hint, ours) if h)
        out.append(Finding(f"barman_check.{c.name}", CRITICAL, f"barman check {c.name} FAILED", hint or None))
    return out


def freshness_finding(backups: Sequence[BackupSummary], now: datetime, max_age_hours: float) -> Finding:
    done = [b for b in backups if b.is_done and b.end_time is not None]
    if not done:
        return Finding("backup_freshness", CRITICAL, "no DONE backup at all",
                       "take a backup now: `barman backup --wait` or trigger dr_weekly_full_backup")
    newest = max(done, key=lambda b: b.end_time)  # type: ignore[arg-type, return-value]
    age_h = (now - newest.end_time).total_seconds() / 3600  # type: ignore[operator]
    if age_h > max_age_hours:
        return Finding("backup_freshness", CRITICAL,
                       f"newest DONE backup {newest.backup_id} is {age_h:.1f} h old (max {max_age_hours:g} h)",
                       "the weekly backup did not run or failed: check dr_weekly_full_backup, take a backup now")
    return Finding("backup_freshness", OK, f"newest DONE backup {newest.backup_id} is {age_h:.1f} h old "
                                           f"(max {max_age_hours:g} h)")


def wal_continuity_findings(catalog: Sequence[str], oldest_begin_wal: str | None, current_wal: str | None,
                            max_lag_files: float, files_on_disk: Iterable[str] | None = None,
                            ) -> tuple[list[Finding], dict[str, Any]]:
    """No gap from the oldest kept backup's begin WAL to the newest archived segment; lag behind the server.

    The current segment (still being written, a `.partial` in Barman's streaming
    directory) is never archived yet: lag counts the segments between the newest
    archived one and the server's current one, so a healthy server shows 0 or 1.

    `files_on_disk` (the segment files really present in Barman's `wals` directory):
    a segment the catalogue lists but whose file is gone (deleted by hand, lost with a
    disk) is a gap too; without it only the catalogue is trusted.
    """
    segs = [n for n in catalog if is_wal_segment_name(n)]
    facts: dict[str, Any] = {"first_wal": oldest_begin_wal, "current_wal": current_wal}
    if files_on_disk is not None:
        disk = set(files_on_disk)
        first_segno = WalSegment.parse(oldest_begin_wal).segno if oldest_begin_wal else -1
        lost = sorted(n for n in segs if n not in disk and WalSegment.parse(n).segno >= first_segno)
        facts["catalogued_files_missing"] = lost[:50]
        segs = [n for n in segs if n in disk]
    if not oldest_begin_wal:
        return [Finding("wal_continuity", CRITICAL, "no kept backup with a begin WAL: nothing to check from",
                        "take a backup")], facts
    if not segs:
        return [Finding("wal_continuity", CRITICAL, "Barman's WAL catalogue is empty", CHECK_HINTS["receive_wal_running"])], facts
    newest = max(segs, key=lambda n: (WalSegment.parse(n).segno, WalSegment.parse(n).timeline))
    facts["newest_archived"] = newest
    out: list[Finding] = []
    first = WalSegment.parse(oldest_begin_wal)
    if WalSegment.parse(newest).segno < first.segno:
        out.append(Finding("wal_continuity", CRITICAL,
                           f"nothing archived since the oldest backup's begin WAL {oldest_begin_wal}",
                           CHECK_HINTS["receive_wal_running"]))
    else:
        cov = compute_coverage(segs, oldest_begin_wal, newest)
        facts["coverage"] = cov.to_dict()
        if cov.complete:
            out.append(Finding("wal_continuity", OK, f"{cov.present} segments {oldest_begin_wal}..{newest}, no gap"))
        else:
            lost_note = ""
            if facts.get("catalogued_files_missing"):
                lost_note = (" (listed in Barman's catalogue but the file is gone: "
                             + ", ".join(facts["catalogued_files_missing"][:10]) + ")")
            out.append(Finding("wal_continuity", CRITICAL,
                               f"WAL missing from the archive between {oldest_begin_wal} and {newest}: "
                               + ", ".join(cov.missing_ranges()) + lost_note,
                               "recovery past the gap is impossible: take a new full backup now; find out why the "
                               "segments are missing (retention, manual deletion, streaming gap)"))
    if current_wal:
        lag = WalSegment.parse(current_wal).segno - WalSegment.parse(newest).segno - 1
        lag = max(lag, 0)
        facts["archive_lag_files"] = lag
        if lag > max_lag_files:
            out.append(Finding("wal_archive_lag", WARNING,
                               f"{lag} WAL files not yet archived (server at {current_wal}, archive at {newest}; "
                               f"max {max_lag_files:g})", CHECK_HINTS["receive_wal_running"]))
        else:
            out.append(Finding("wal_archive_lag", OK, f"{lag} WAL files behind the server (max {max_lag_files:g})"))
    else:
        out.append(Finding("wal_archive_lag", WARNING, "the server's current WAL is unknown (primary unreachable?)"))
    return out, facts


def streaming_findings(receive_wal_running: bool, slot_name: str | None, slot_active: bool | None) -> list[Finding]:
    out = []
    if receive_wal_running:
        out.append(Finding("receive_wal", OK, "receive-wal is running"))
    else:
        out.append(Finding("receive_wal", CRITICAL, "receive-wal is NOT running: WAL is not being archived",
                           CHECK_HINTS["receive_wal_running"]))
    if slot_name:
        if slot_active is None:
            out.append(Finding("replication_slot", CRITICAL, f"replication slot {slot_name!r} does not exist on the "
                               "primary", "`barman receive-wal --create-slot <server>` then `barman cron`"))
        elif not slot_active:
            out.append(Finding("replication_slot", CRITICAL, f"replication slot {slot_name!r} is not active",
                               CHECK_HINTS["replication_slot"]))
        else:
            out.append(Finding("replication_slot", OK, f"replication slot {slot_name!r} is active"))
    return out


def standby_findings(expected: Sequence[str], clients: Sequence[Mapping[str, Any]], max_lag_bytes: float,
                     delayed: Iterable[str] = ()) -> list[Finding]:
    """Each inventory standby must stream from the primary, with replay lag under the threshold.

    Lag comes from Barman's `replication-status` (`replay_lsn_diff_bytes` is negative when behind).
    A delayed standby replays late on purpose: for it only the streaming state counts here, and
    `delayed_standby_finding` judges its replay against its delay.
    """
    delayed = set(delayed)
    by_name = {str(c.get("application_name")): c for c in clients}
    out = []
    for name in expected:
        c = by_name.get(name)
        if c is None:
            out.append(Finding(f"standby.{name}", CRITICAL, f"standby {name} is not connected to the primary",
                               "start the standby / check its primary_conninfo and its log"))
            continue
        state = c.get("current_state")
        diff = c.get("replay_lsn_diff_bytes")
        lag = abs(int(diff)) if diff is not None else None
        if state != "streaming":
            out.append(Finding(f"standby.{name}", CRITICAL, f"standby {name} is {state}, not streaming"))
        elif name in delayed:
            out.append(Finding(f"standby.{name}", OK, f"standby {name} streaming (delayed: replay "
                                                      f"{'?' if lag is None else lag} bytes behind, on purpose)"))
        elif lag is None:
            out.append(Finding(f"standby.{name}", WARNING, f"standby {name} streams but reports no replay position"))
        elif lag > max_lag_bytes:
            out.append(Finding(f"standby.{name}", WARNING, f"standby {name} replay lag {lag} bytes "
                               f"(max {max_lag_bytes:g})", "check the standby's I/O and network"))
        else:
            out.append(Finding(f"standby.{name}", OK, f"standby {name} streaming, replay lag {lag} bytes"))
    return out


@dataclass(frozen=True)
class DelayedReplay:
    """What a delayed standby says about its own replay (one query on it, see DELAYED_REPLAY_SQL)."""

    in_recovery: bool
    paused: bool
    #: bytes received but not yet replayed (0: everything received is applied)
    pending_bytes: int
    #: seconds since the commit time of the last transaction it replayed (None: none replayed yet)
    replay_age_s: float | None
    #: its recovery_min_apply_delay, in seconds, as PostgreSQL runs it
    configured_delay_s: float
    #: what its startup process waits on: `RecoveryApplyDelay` = holding the next commit back on schedule
    wait_event: str = ""

    @property
    def waiting_on_delay(self) -> bool:
        return self.wait_event == "RecoveryApplyDelay"

    @classmethod
    def from_row(cls, row: Sequence[str]) -> DelayedReplay:
        """The psql -At row of DELAYED_REPLAY_SQL (t/f, t/f, bytes, seconds or empty, milliseconds, wait event)."""
        in_rec, paused, pending, age, delay_ms, wait = (list(row) + [""] * 6)[:6]
        return cls(in_recovery=in_rec == "t", paused=paused == "t", pending_bytes=int(float(pending or 0)),
                   replay_age_s=float(age) if age not in ("", None) else None,
                   configured_delay_s=float(delay_ms or 0) / 1000, wait_event=wait.strip())


#: on the delayed standby: recovery state, replay pause, received-but-not-replayed bytes, the age
#: of the last replayed commit, the delay it runs with (ms), and what its startup process waits on
DELAYED_REPLAY_SQL = (
    "SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END, "
    "coalesce(pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()), 0)::bigint, "
    "round(extract(epoch FROM now() - pg_last_xact_replay_timestamp())::numeric, 3), "
    "(SELECT setting FROM pg_settings WHERE name = 'recovery_min_apply_delay'), "
    "coalesce((SELECT wait_event FROM pg_stat_activity WHERE backend_type = 'startup'), '')")


def delayed_standby_finding(name: str, delay_s: int, tolerance_s: int, replay: DelayedReplay
                            ) -> tuple[Finding, dict[str, Any]]:
    """Is the delayed standby a usable recovery source, and how far back does it protect?

    Its protected window is the age of the last transaction it replayed: damage younger than
    that is not applied there yet, so it can be undone from it in seconds. Healthy is a window
    in `[delay, delay + tolerance]`. Exceptions, each named:
    - nothing pending (an idle primary): the window is everything since its last commit (OK);
    - a window below the delay while WAL waits, with the inventory's delay configured: the last
      record applied was not a delayed commit (an abort), or the delay was raised lately (OK, said);
    - a window past `delay + tolerance` while its startup process waits on `RecoveryApplyDelay`:
      a quiet database whose next commit is waiting its turn (OK, said);
    - a window past `delay + tolerance` while WAL waits: it has fallen behind (replay paused
      or too slow): the window still protects, but older damage is applied later than planned
      and a PITR from it replays more WAL: WARNING;
    - not in recovery (promoted), or its configured delay differs from the inventory's: CRITICAL,
      it is no delayed standby at all.
    """
    check = f"delayed.{name}"
    facts: dict[str, Any] = {"standby": name, "delay_s": delay_s, "tolerance_s": tolerance_s,
                             "configured_delay_s": replay.configured_delay_s, "paused": replay.paused,
                             "pending_bytes": replay.pending_bytes, "protected_window_s": None}
    if not replay.in_recovery:
        return Finding(check, CRITICAL, f"delayed standby {name} is not in recovery (promoted?): no delayed copy "
                                        "protects this server", "rebuild it (a PITR's rebuild_standby does)"), facts
    if abs(replay.configured_delay_s - delay_s) > 1:
        return Finding(check, CRITICAL, f"delayed standby {name} runs with recovery_min_apply_delay "
                                        f"{replay.configured_delay_s:g}s, the inventory says {delay_s}s",
                       "set recovery_min_apply_delay to the inventory's delay (ALTER SYSTEM, reload), or fix "
                       "the inventory"), facts
    age = replay.replay_age_s
    facts["protected_window_s"] = age
    if age is None:  # started or rebuilt lately, with the inventory's delay (checked above)
        return Finding(check, OK, f"delayed standby {name} has replayed no transaction since it started: its "
                                  f"window grows to its delay {_human(delay_s)} from its first one"), facts
    window = f"damage younger than {_human(age)} can be undone from it"
    pause = " (replay paused)" if replay.paused else ""
    if replay.pending_bytes <= 0:
        return Finding(check, OK, f"delayed standby {name}: nothing waiting to be applied (idle primary); "
                                  f"{window}{pause}"), facts
    if age < delay_s - tolerance_s:  # its delay is the inventory's (checked above)
        return Finding(check, OK, f"delayed standby {name}: window {_human(age)}, below its delay "
                                  f"{_human(delay_s)} (the last record it applied was not a delayed commit, or the "
                                  f"delay was raised lately){pause}; {window}"), facts
    if age > delay_s + tolerance_s and replay.waiting_on_delay and not replay.paused:
        # a quiet database: the next commit is simply waiting its turn (commits further apart than the tolerance)
        return Finding(check, OK, f"delayed standby {name}: holding the next commit back for its delay "
                                  f"{_human(delay_s)} (no commit in between: a quiet database); {window}"), facts
    if age > delay_s + tolerance_s:
        return Finding(check, WARNING, f"delayed standby {name} has fallen behind its window: {_human(age)} behind, "
                                       f"delay {_human(delay_s)} + tolerance {_human(tolerance_s)}{pause}; {window}",
                       "resume replay (SELECT pg_wal_replay_resume()) unless a DR run paused it; check its I/O "
                       "and restore_command"), facts
    return Finding(check, OK, f"delayed standby {name} within its window ({_human(age)}, delay {_human(delay_s)})"
                              f"{pause}; {window}"), facts


def _human(seconds: float) -> str:
    s = round(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}min {s % 60}s" if s % 60 else f"{s // 60}min"
    return f"{s // 3600}h {s % 3600 // 60}min"


def orphan_findings(orphans: Sequence[Any]) -> list[Finding]:
    """Scratch copies and postmasters of DR runs that are over (barman_dr.safety.orphans): WARNING each, never deleted."""
    left = [o for o in orphans if not o.in_use]
    if not left:
        busy = [o for o in orphans if o.in_use]
        return [Finding("orphans", OK, "no staging or salvage copies left by ended DR runs"
                        + (f" ({len(busy)} in use by the run holding the lock)" if busy else ""))]
    return [Finding("orphans", WARNING, f"left by a DR run that is over: {o.describe()}",
                    "not live data; stop its postmaster (pg_ctl stop -D <dir> -m fast) and remove the directory once "
                    "nobody needs it (a staged copy is a proven restore), or resume that run if it crashed")
            for o in left]


def parse_df_percent(text: str) -> tuple[float, str]:
    """`df -P DIR` -> (use percent, mount point)."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if len(lines) < 2:
        raise ValueError(f"unexpected df -P output: {text!r}")
    parts = lines[-1].split()
    used, avail = int(parts[2]), int(parts[3])
    pct = 100.0 * used / (used + avail) if used + avail else 0.0
    return round(pct, 1), parts[-1]


def disk_finding(percent: float, mount: str, directory: str, max_percent: float) -> Finding:
    if percent > max_percent:
        return Finding("disk_usage", CRITICAL, f"{directory} ({mount}) is {percent:.1f}% full (max {max_percent:g}%)",
                       "free space or grow the volume before the next backup fails; check retention")
    return Finding("disk_usage", OK, f"{directory} ({mount}) is {percent:.1f}% full (max {max_percent:g}%)")


def build_report(server: str, findings: Sequence[Finding], facts: Mapping[str, Any] | None = None,
                 checked_at: str | None = None) -> dict[str, Any]:
    status = worst(f.status for f in findings)
    return {
        "server": server,
        "status": status,
        "checked_at": checked_at,
        "reasons": [f"{f.status}: {f.reason}" + (f" (hint: {f.hint})" if f.hint else "")
                    for f in findings if f.status != OK],
        "findings": [f.to_dict() for f in findings],
        "facts": dict(facts or {}),
    }


def summarise(reports: Mapping[str, Mapping[str, Any] | None]) -> dict[str, Any]:
    """The fleet view: a server without a report (its task failed) counts as CRITICAL."""
    per_server: dict[str, str] = {}
    reasons: dict[str, list[str]] = {}
    for server, rep in sorted(reports.items()):
        if not rep:
            per_server[server] = CRITICAL
            reasons[server] = ["CRITICAL: the verification task failed, no report (see its log)"]
        else:
            per_server[server] = str(rep.get("status", CRITICAL))
            if per_server[server] not in _RANK:
                per_server[server] = CRITICAL
            if rep.get("reasons"):
                reasons[server] = list(rep["reasons"])
            elif per_server[server] == SKIPPED:
                reasons[server] = [f"SKIPPED: {rep.get('skipped') or 'not applicable'}"]
    return {"status": worst(per_server.values()) if per_server else CRITICAL, "servers": per_server,
            "reasons": reasons,
            "critical": sorted(s for s, v in per_server.items() if v == CRITICAL),
            "skipped": sorted(s for s, v in per_server.items() if v == SKIPPED),
            "warning": sorted(s for s, v in per_server.items() if v == WARNING)}


# ------------------------------------------------------------------------------------------ retention


def window_obsolete(backups: Sequence[BackupSummary], recovery_window_days: float, now: datetime) -> list[str]:
    """Backups a RECOVERY WINDOW policy makes obsolete (Barman's rule, from the inventory's window).

    Every DONE backup that ended before the window's start is obsolete, except the
    newest of them: recovery to the window's first instant starts from it.
    """
    start = now - timedelta(days=float(recovery_window_days))
    before = sorted((b for b in backups if b.is_done and b.end_time is not None and b.end_time < start),
                    key=lambda b: b.backup_id)
    return [b.backup_id for b in before[:-1]]


def retention_plan(backups: Sequence[BackupSummary], minimum_redundancy: int,
                   protect: Iterable[str] = (), recovery_window_days: float | None = None,
                   now: datetime | None = None) -> dict[str, Any]:
    """Which OBSOLETE backups may be deleted without going below minimum redundancy.

    Barman marks backups OBSOLETE from the retention policy of its own configuration
    (`list-backups` retention_status); with `recovery_window_days` (the inventory's
    policy, which may be stricter than barman.conf's) the window rule is applied here
    too. We delete oldest first, and never so many that fewer than
    `minimum_redundancy` DONE backups remain; `protect` (e.g. the backup just taken)
    is never deleted.
    """
    protected = set(protect)
    done = sorted((b for b in backups if b.is_done), key=lambda b: b.backup_id)
    by_window = set(window_obsolete(done, recovery_window_days, now)) \
        if recovery_window_days is not None and now is not None else set()
    obsolete = [b.backup_id for b in done if ((b.retention_status or "").upper() == "OBSOLETE"
                                              or b.backup_id in by_window) and b.backup_id not in protected]
    may_delete = max(len(done) - max(int(minimum_redundancy), 1), 0)
    delete = obsolete[:may_delete]
    return {"done": len(done), "minimum_redundancy": int(minimum_redundancy), "obsolete": obsolete,
            "delete": delete, "kept_for_redundancy": obsolete[len(delete):],
            "remaining_after": len(done) - len(delete)}
