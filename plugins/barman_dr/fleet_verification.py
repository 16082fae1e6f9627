"""Each server's daily report from its barman host's batched probes: no I/O, one evaluation per server.

The per-host task (operators/verify_host.py) runs Barman once per host (`check all`,
`list-backups all`, `show-servers all`, `replication-status all`), reads every server's
files in one SSH exec (barman_files.py), lists orphans in one SSH exec per database host
and reads the audit trail once. Each of those is a `Probe`: a value, or the error that
stopped it. `evaluate_server` then builds exactly the findings and facts the per-server
task used to build, from that server's part of each probe:

- a probe that failed for the whole host is a CRITICAL finding for each of its servers
  (`<probe> could not be measured: ...`), never a crash and never a silent OK;
- a server missing from a batched output (not configured in that Barman, a typo in the
  inventory) is a CRITICAL finding for that server only;
- sections of servers that are not this entry's (two inventory entries sharing one Barman
  installation: `check all` returns both) are never looked at.

The primary's current WAL and its replication slot come from `show-servers all`: Barman
connects to each server for it (the same connection it archives from), so the fleet check
opens no SSH session per server.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from barman_dr.barman_files import FileSection, ServerFiles, begin_wal_of, catalog_rows
from barman_dr.exceptions import BarmanOutputError
from barman_dr.models import CheckReport, is_wal_segment_name, parse_list_backups, server_section
from barman_dr.verification import (
    CRITICAL,
    DelayedReplay,
    Finding,
    check_findings,
    delayed_standby_finding,
    disk_finding,
    freshness_finding,
    orphan_findings,
    parse_df_percent,
    standby_findings,
    streaming_findings,
    thresholds_for,
    wal_continuity_findings,
)


def describe_error(exc: BaseException) -> str:
    """`Type: last line of the message`, as the per-server probes always reported it."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"


@dataclass(frozen=True)
class Probe:
    """One host-level probe's result: its value, or why it could not be measured."""

    value: Any = None
    error: str | None = None

    @classmethod
    def run(cls, fn: Callable[[], Any]) -> Probe:
        try:
            return cls(value=fn())
        except Exception as exc:  # noqa: BLE001 - a failed probe becomes findings, not a crash
            return cls(error=describe_error(exc))

    @classmethod
    def failed(cls, error: str) -> Probe:
        return cls(error=error)


@dataclass(frozen=True)
class ServerSpec:
    """What the inventory says about a server that its evaluation needs."""

    name: str
    standbys: tuple[str, ...] = ()
    verification: Mapping[str, float] | None = None
    #: its delayed standbys: (name, delay seconds, tolerance seconds)
    delayed: tuple[tuple[str, int, int], ...] = ()


@dataclass
class HostSnapshot:
    """Everything the per-host probes measured, each a Probe (see the module docstring)."""

    check: Probe
    backups: Probe
    servers: Probe
    replication: Probe = field(default_factory=lambda: Probe(value={}))
    #: (df section, {server: ServerFiles}) from BarmanHook.server_files
    files: Probe = field(default_factory=lambda: Probe(error="not measured"))
    #: {server: [Orphan], or the error of its database host's listing}
    orphans: Probe = field(default_factory=lambda: Probe(value={}))
    #: {delayed standby name: DelayedReplay, or why it could not be asked}
    delayed: Probe = field(default_factory=lambda: Probe(value={}))
    backup_directory: str = ""


def own_sections(payload: Mapping[str, Any], servers: Sequence[str]) -> dict[str, Any]:
    """The sections of `servers` only (and Barman's `_ERROR` list): `all` on a shared installation
    returns other entries' servers too, which are never looked at."""
    wanted = {*servers, "_ERROR"}
    return {k: v for k, v in payload.items() if k in wanted}


def _require(payload: Any, server: str, what: str) -> Any:
    """The payload itself, once it is known to hold `server`'s section; else why not (Barman's own error)."""
    if isinstance(payload, Mapping) and server not in payload and payload.get("_ERROR"):
        raise BarmanOutputError(f"{what}: no section for server {server!r}; Barman: "
                                + "; ".join(str(e) for e in payload["_ERROR"]))
    return payload


def oldest_done_backup_ids(backups_payload: Mapping[str, Any], servers: Sequence[str]) -> dict[str, str | None]:
    """{server: id of its oldest DONE backup or None}; servers whose rows do not parse are left out."""
    out: dict[str, str | None] = {}
    for s in servers:
        try:
            done = sorted(b.backup_id for b in parse_list_backups(backups_payload, s) if b.is_done)
        except (BarmanOutputError, ValueError, TypeError):
            continue
        out[s] = done[0] if done else None
    return out


_SLOT_ACTIVE_RE = re.compile(r"active=(True|False)")


def slot_active(info: Mapping[str, Any]) -> bool | None:
    """Barman's `replication_slot` (`Record(slot_name=..., active=True, restart_lsn=...)`): None = no such slot."""
    raw = info.get("replication_slot")
    if raw in (None, "", "None"):
        return None
    if isinstance(raw, Mapping):
        return bool(raw.get("active"))
    if isinstance(raw, (list, tuple)) and len(raw) >= 2:
        return bool(raw[1])
    m = _SLOT_ACTIVE_RE.search(str(raw))
    if not m:
        raise BarmanOutputError(f"show-servers: unreadable replication_slot {raw!r}")
    return m.group(1) == "True"


def _files_of(files: Any, server: str) -> ServerFiles:
    per_server = files[1]
    if server not in per_server:
        raise BarmanOutputError(f"no files read for server {server!r}: its paths come from show-servers (see "
                                "show_server)")
    return per_server[server]


def _section(files: Any, server: str, name: str) -> FileSection:
    sec = _files_of(files, server).section(name)
    if sec.error is not None:
        raise BarmanOutputError(f"{name}: {sec.error}")
    return sec


def evaluate_server(spec: ServerSpec, snap: HostSnapshot, now: datetime) -> tuple[list[Finding], dict[str, Any]]:
    """One server's findings and facts, in the order and with the names the per-server task used."""
    name = spec.name
    th = thresholds_for(spec.verification)
    findings: list[Finding] = []
    facts: dict[str, Any] = {"thresholds": th}

    def take(probe_name: str, probe: Probe, extract: Callable[[Any], Any]) -> Any:
        if probe.error is not None:
            findings.append(Finding(probe_name, CRITICAL, f"{probe_name} could not be measured: {probe.error}"))
            return None
        try:
            return extract(probe.value)
        except Exception as exc:  # noqa: BLE001 - this server's part is missing or broken: its finding
            findings.append(Finding(probe_name, CRITICAL, f"{probe_name} could not be measured: "
                                    f"{describe_error(exc)}"))
            return None

    check = take("barman_check", snap.check, lambda p: CheckReport.from_json(_require(p, name, "check"), name))
    if check is not None:
        findings += check_findings(check)
        facts["barman_check_failed"] = [c.name for c in check.failed]

    backups = take("list_backups", snap.backups,
                   lambda p: parse_list_backups(_require(p, name, "list-backups"), name))
    oldest_begin = None
    if backups is not None:
        findings.append(freshness_finding(backups, now, th["max_backup_age_hours"]))
        done = sorted((b for b in backups if b.is_done), key=lambda b: b.backup_id)
        facts["done_backups"] = [b.backup_id for b in done]
        ends = sorted(b.end_time for b in done if b.end_time)
        # what /barman-dr/metrics exports, without running Barman again
        facts["newest_backup_end"] = ends[-1].isoformat() if ends else None
        facts["oldest_backup_end"] = ends[0].isoformat() if ends else None
        if done:
            oldest_begin = take("show_backup", snap.files, lambda f: _begin_wal(f, name, done[0].backup_id))

    info = take("show_server", snap.servers, lambda p: _server_info(p, name))
    current = None
    if info is not None:
        current = info.get("current_xlog") or None
        if not current:
            why = info.get("connection_error") or "Barman reports no current WAL for it"
            findings.append(Finding("primary_current_wal", CRITICAL,
                                    f"primary_current_wal could not be measured: {str(why).strip()[-300:]}"))

    catalog = take("wal_catalog", snap.files, lambda f: catalog_rows(_section(f, name, "xlogdb")))
    # the catalogue alone would not see a segment file deleted by hand: the files are listed too
    on_disk = take("wal_files", snap.files, lambda f: {n[:24] for n in _section(f, name, "files").lines
                                                       if is_wal_segment_name(n.strip()[:24])})
    if catalog:
        times = [t for (n, _s, t, _c) in catalog if is_wal_segment_name(n) and t]
        facts["newest_wal_time"] = datetime.fromtimestamp(max(times), UTC).isoformat() if times else None
    if catalog is not None and backups is not None:
        wal_f, wal_facts = wal_continuity_findings([n for (n, *_r) in catalog if is_wal_segment_name(n)],
                                                   oldest_begin, current, th["max_wal_lag_files"],
                                                   files_on_disk=on_disk)
        findings += wal_f
        facts["wal"] = wal_facts

    if check is not None and info is not None:
        # Barman's own receive-wal check (its process manager, what list-processes reads); absent
        # when streaming_archiver is off, and then no receive-wal runs either
        receiving = any(c.name == "receive_wal_running" and c.ok for c in check.checks)
        slot = info.get("slot_name") or None
        active: bool | None = None
        if slot and not current:
            findings.append(Finding("slot_state", CRITICAL, "slot_state could not be measured: Barman cannot "
                                    "query the primary"))
            slot = None  # unknown, not missing: only the receive-wal finding below
        elif slot:
            try:
                active = slot_active(info)
            except BarmanOutputError as exc:
                findings.append(Finding("slot_state", CRITICAL, f"slot_state could not be measured: "
                                        f"{describe_error(exc)}"))
                slot = None
        findings += streaming_findings(receiving, slot, active)

    if spec.standbys:
        rep = take("replication_status", snap.replication, lambda p: dict(server_section(
            _require(p, name, "replication-status"), name, "replication-status")))
        if rep is not None:
            findings += standby_findings(list(spec.standbys), rep.get("streaming_clients") or [],
                                         th["max_standby_lag_bytes"], delayed=[d[0] for d in spec.delayed])
    windows = []
    for sb, delay_s, tol_s in spec.delayed:
        replay = take(f"delayed.{sb}", snap.delayed, lambda d, sb=sb: _delayed_of(d, sb))
        if replay is not None:
            finding, window = delayed_standby_finding(sb, delay_s, tol_s, replay)
            findings.append(finding)
            windows.append(window)
    if spec.delayed:
        facts["delayed_standbys"] = windows

    df = take("disk_usage", snap.files, _df_section)
    if df is not None:
        pct, mount = parse_df_percent("\n".join(df.lines))
        facts["disk_usage_percent"] = pct
        findings.append(disk_finding(pct, mount, snap.backup_directory, th["max_disk_usage_percent"]))

    orphans = take("orphans", snap.orphans, lambda d: _orphans_of(d, name))
    if orphans is not None:
        findings += orphan_findings(orphans)
        facts["orphans"] = [o.to_dict() for o in orphans]
    return findings, facts


def _delayed_of(per_standby: Mapping[str, Any], standby: str) -> DelayedReplay:
    found = per_standby.get(standby)
    if found is None:
        raise BarmanOutputError(f"delayed standby {standby!r} was not asked")
    if isinstance(found, str):  # its database host or PostgreSQL did not answer
        raise BarmanOutputError(found)
    return found


def _orphans_of(per_server: Mapping[str, Any], server: str) -> list[Any]:
    found = per_server.get(server)
    if found is None:
        raise BarmanOutputError(f"no orphan listing for server {server!r}")
    if isinstance(found, str):  # its database host could not be listed
        raise BarmanOutputError(found)
    return list(found)


def _begin_wal(files: Any, server: str, backup_id: str) -> str | None:
    sec = _section(files, server, "begin_wal")
    wal = begin_wal_of(sec)
    if wal is None:
        raise BarmanOutputError(f"backup {backup_id}: no begin_wal in its backup.info")
    return wal


def _server_info(payload: Any, server: str) -> dict[str, Any]:
    data = server_section(_require(payload, server, "show-servers"), server, "show-servers")
    if not isinstance(data, dict):
        raise BarmanOutputError("show-servers: expected an object")
    return data


def _df_section(files: Any) -> FileSection:
    df = files[0]
    if df.error is not None:
        raise BarmanOutputError(f"df: {df.error}")
    return df
