"""The plan's RTO estimate, for the mode that will actually run, calibrated from the server's own earlier runs (pure).

Two figures, because an incident commander watches both:

* **downtime**: app frozen -> app resumed. Staged (the default), it holds neither the copy
  nor the replay: it is the fixed cost of stop, rename, start, proof and resume, taken as
  the median of this server's earlier staged PITRs. Unstaged, it holds the restore and
  the replay too.
* **time-to-recovered**: trigger -> the app serving recovered data: what already ran
  (validation, resolution, the WAL proof), then, staged, the copy and the replay before
  the freeze, then the downtime.

Rates come from the audit trail: restore bytes per second from earlier restores (PITR
staging, unstaged restores, monthly drills), replay bytes per second from earlier
replays; medians, so one odd run does not swing the estimate. Without history, assumed
rates are used and the estimate says so.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from statistics import median
from typing import Any

ASSUMED_RESTORE_BPS = 50 * 1024 * 1024
ASSUMED_REPLAY_BPS = 32 * 1024 * 1024
ASSUMED_STAGED_DOWNTIME_S = 10.0
ASSUMED_UNSTAGED_OVERHEAD_S = 20.0
ASSUMED_STAGE_OVERHEAD_S = 5.0
#: below this, a measured rate is noise (a tiny copy dominated by start-up): ignored
MIN_SAMPLE_BYTES = 1024 * 1024


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f > 0 else None


@dataclass
class Calibration:
    """Samples taken from a server's audit events (newest first), reduced to medians."""

    restore_bps: list[float] = field(default_factory=list)
    replay_bps: list[float] = field(default_factory=list)
    staged_downtime_s: list[float] = field(default_factory=list)
    unstaged_overhead_s: list[float] = field(default_factory=list)
    stage_overhead_s: list[float] = field(default_factory=list)

    def add_rate(self, which: list[float], nbytes: Any, seconds: Any) -> None:
        b, s = _num(nbytes), _num(seconds)
        if b and s and b >= MIN_SAMPLE_BYTES:
            which.append(b / s)

    @classmethod
    def from_events(cls, events: Iterable[dict[str, Any]], limit: int = 20) -> Calibration:
        cal = cls()
        for e in events:
            d = e.get("details")
            if e.get("outcome") != "ok" or not isinstance(d, dict):
                continue
            action = e.get("action")
            if action == "stage_restore" and d.get("staged"):
                cal.add_rate(cal.restore_bps, d.get("bytes"), d.get("restore_s"))
                replay = d.get("replay") or {}
                cal.add_rate(cal.replay_bps, d.get("replay_bytes"), replay.get("replay_s"))
                total, r1, r2 = _num(d.get("duration_s")), _num(d.get("restore_s")), _num(replay.get("replay_s"))
                if total and r1 and r2 and total > r1 + r2:
                    cal.stage_overhead_s.append(total - r1 - r2)
            elif action == "barman_restore" and d.get("mode") == "restore":
                cal.add_rate(cal.restore_bps, d.get("bytes"), d.get("restore_s"))
            elif action == "start_recovery":
                cal.add_rate(cal.replay_bps, d.get("replay_bytes"), d.get("recovery_s"))
            elif action == "drill_result":
                phases = d.get("phases_s") or {}
                cal.add_rate(cal.restore_bps, d.get("backup_bytes"), phases.get("restore_s"))
                cal.add_rate(cal.replay_bps, d.get("replay_bytes"), phases.get("recovery_s"))
            elif action == "report":
                if d.get("source") == "delayed_standby":  # no restore in its window: not a Barman sample
                    continue
                rto = _num(d.get("rto_s"))
                if rto is None:
                    continue
                if d.get("staged_restore"):
                    cal.staged_downtime_s.append(rto)
                else:
                    phases = d.get("phases_s") or {}
                    work = sum(_num(phases.get(p)) or 0 for p in ("barman_restore", "start_recovery"))
                    if rto > work:
                        cal.unstaged_overhead_s.append(rto - work)
        for name in ("restore_bps", "replay_bps", "staged_downtime_s", "unstaged_overhead_s", "stage_overhead_s"):
            setattr(cal, name, getattr(cal, name)[:limit])
        return cal


def _pick(samples: list[float], assumed: float, unit: str) -> tuple[float, str]:
    if samples:
        return median(samples), f"median of {len(samples)} earlier run(s)"
    shown = f"{assumed / 1048576:g} MiB/s" if unit == "B/s" else f"{assumed:g} {unit}"
    return assumed, f"assumed {shown} (no earlier run of this server)"


def estimate(*, backup_bytes: int, replay_bytes: int, staged: bool, calibration: Calibration,
             elapsed_s: float = 0.0) -> dict[str, Any]:
    """Downtime and time-to-recovered for the mode that will run (see the module docstring)."""
    restore_bps, restore_src = _pick(calibration.restore_bps, ASSUMED_RESTORE_BPS, "B/s")
    replay_bps, replay_src = _pick(calibration.replay_bps, ASSUMED_REPLAY_BPS, "B/s")
    restore_s = backup_bytes / restore_bps
    replay_s = replay_bytes / replay_bps
    if staged:
        downtime, down_src = _pick(calibration.staged_downtime_s, ASSUMED_STAGED_DOWNTIME_S, "s")
        stage_over, _ = _pick(calibration.stage_overhead_s, ASSUMED_STAGE_OVERHEAD_S, "s")
        before_freeze = restore_s + replay_s + stage_over
    else:
        overhead, down_src = _pick(calibration.unstaged_overhead_s, ASSUMED_UNSTAGED_OVERHEAD_S, "s")
        downtime = restore_s + replay_s + overhead
        before_freeze = 0.0
    ttr = elapsed_s + before_freeze + downtime
    return {
        "mode": "staged" if staged else "unstaged",
        "downtime_s": round(downtime, 1), "time_to_recovered_s": round(ttr, 1),
        "restore_s": round(restore_s, 1), "replay_s": round(replay_s, 1),
        "before_freeze_s": round(before_freeze, 1), "elapsed_before_plan_s": round(elapsed_s, 1),
        "backup_bytes": int(backup_bytes), "replay_bytes": int(replay_bytes),
        "restore_bytes_per_s": int(restore_bps), "replay_bytes_per_s": int(replay_bps),
        "sources": {"restore_rate": restore_src, "replay_rate": replay_src, "downtime": down_src},
        # kept for the report's "estimated vs measured" line and older readers
        "total_s": round(ttr, 1),
    }
