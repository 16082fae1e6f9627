"""Typed models of what Barman and PostgreSQL tell us.

JSON from `barman -f json` enters the system here and nowhere else: each model has a
`from_json` that checks the fields it needs and fails with `BarmanOutputError` when the
shape is not what Barman 3.19.1 prints. Everything downstream handles attributes, not
dict keys (Barman's own `infofile.py` does the same for backup.info).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from barman_dr.exceptions import BarmanOutputError, ValidationError

# --------------------------------------------------------------------------- WAL names

WAL_NAME_RE = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
#: 16 MiB segments (PostgreSQL's default and the lab's): 256 segments per logical xlog id.
SEGMENTS_PER_XLOGID = 0x100000000 // (16 * 1024 * 1024)


@dataclass(frozen=True, order=True)
class WalSegment:
    """A WAL segment name (`TTTTTTTTXXXXXXXXYYYYYYYY`) as timeline + absolute segment number."""

    timeline: int
    segno: int

    @classmethod
    def parse(cls, name: str) -> WalSegment:
        m = WAL_NAME_RE.match(name or "")
        if not m:
            raise ValueError(f"not a WAL segment name: {name!r}")
        tli, log, seg = (int(g, 16) for g in m.groups())
        return cls(tli, log * SEGMENTS_PER_XLOGID + seg)

    @classmethod
    def from_lsn(cls, timeline: int, lsn: Lsn) -> WalSegment:
        return cls(timeline, lsn.value // (16 * 1024 * 1024))

    @property
    def name(self) -> str:
        return f"{self.timeline:08X}{self.segno // SEGMENTS_PER_XLOGID:08X}{self.segno % SEGMENTS_PER_XLOGID:08X}"

    def __str__(self) -> str:
        return self.name


def is_wal_segment_name(name: str) -> bool:
    return bool(WAL_NAME_RE.match(name))


@dataclass(frozen=True, order=True)
class Lsn:
    """A PostgreSQL log sequence number (`X/Y`)."""

    value: int

    @classmethod
    def parse(cls, text: str) -> Lsn:
        m = re.fullmatch(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})", (text or "").strip())
        if not m:
            raise ValueError(f"not an LSN: {text!r}")
        return cls((int(m.group(1), 16) << 32) | int(m.group(2), 16))

    def __str__(self) -> str:
        return f"{self.value >> 32:X}/{self.value & 0xFFFFFFFF:X}"


# ------------------------------------------------------------------------ helpers


def _require(data: dict[str, Any], key: str, what: str) -> Any:
    if key not in data:
        raise BarmanOutputError(f"{what}: field {key!r} missing from barman JSON (keys: {sorted(data)[:20]})")
    return data[key]


def _ts(value: Any) -> datetime | None:
    """Barman JSON carries epoch seconds in *_timestamp fields; convert them to aware UTC."""
    if value in (None, "", "None"):
        return None
    try:
        return datetime.fromtimestamp(float(value), tz=UTC)
    except (TypeError, ValueError) as exc:
        raise BarmanOutputError(f"not an epoch timestamp: {value!r}") from exc


def _iso(value: Any) -> datetime | None:
    """Barman prints precise times as `2026-11-25 13:34:19.703926+00:00`; epoch fields drop the fraction."""
    if not isinstance(value, str) or not value or value == "None":
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _int(value: Any) -> int | None:
    if value in (None, "", "None"):
        return None
    return int(value)


def server_section(payload: Any, server: str, what: str) -> Any:
    """Barman's JSON output is keyed by server name; return that server's part."""
    if not isinstance(payload, dict) or server not in payload:
        keys = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise BarmanOutputError(f"{what}: no section for server {server!r} in barman JSON ({keys})")
    return payload[server]


# ------------------------------------------------------------------------- backups


@dataclass(frozen=True)
class BackupSummary:
    """One row of `barman -f json list-backups SERVER`."""

    backup_id: str
    status: str
    end_time: datetime | None
    size_bytes: int | None
    wal_size_bytes: int | None
    backup_type: str | None
    retention_status: str | None
    backup_name: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BackupSummary:
        return cls(
            backup_id=str(_require(data, "backup_id", "list-backups")),
            status=str(_require(data, "status", "list-backups")),
            end_time=_ts(data.get("end_time_timestamp")),
            size_bytes=_int(data.get("size_bytes")),
            wal_size_bytes=_int(data.get("wal_size_bytes")),
            backup_type=data.get("backup_type"),
            retention_status=data.get("retention_status"),
            backup_name=data.get("backup_name") or None,
        )

    @property
    def is_done(self) -> bool:
        return self.status == "DONE"


def parse_list_backups(payload: Any, server: str) -> list[BackupSummary]:
    rows = server_section(payload, server, "list-backups")
    if not isinstance(rows, list):
        raise BarmanOutputError(f"list-backups: expected a list for {server!r}, got {type(rows).__name__}")
    return [BackupSummary.from_json(r) for r in rows]


@dataclass(frozen=True)
class BackupInfo:
    """`barman -f json show-backup SERVER BACKUP_ID`: what a PITR needs to know of a backup."""

    server: str
    backup_id: str
    status: str
    timeline: int
    begin_time: datetime | None
    end_time: datetime | None
    begin_lsn: Lsn | None
    end_lsn: Lsn | None
    begin_wal: str | None
    end_wal: str | None
    size_bytes: int | None
    wal_files: int | None
    last_available_wal: str | None
    copy_time_seconds: float | None
    pgdata: str | None
    system_id: str | None
    postgres_version: str | None
    backup_method: str | None = None
    #: `name:location` of each tablespace (restored to its original location unless relocated)
    tablespaces: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, payload: Any, server: str) -> BackupInfo:
        data = server_section(payload, server, "show-backup")
        base = _require(data, "base_backup_information", "show-backup")
        wal = data.get("wal_information") or {}
        begin_lsn = base.get("begin_lsn")
        end_lsn = base.get("end_lsn")
        return cls(
            server=server,
            backup_id=str(_require(data, "backup_id", "show-backup")),
            status=str(_require(data, "status", "show-backup")),
            timeline=int(_require(base, "timeline", "show-backup.base_backup_information")),
            begin_time=_iso(base.get("begin_time")) or _ts(base.get("begin_time_timestamp")),
            end_time=_iso(base.get("end_time")) or _ts(base.get("end_time_timestamp")),
            begin_lsn=Lsn.parse(begin_lsn) if begin_lsn else None,
            end_lsn=Lsn.parse(end_lsn) if end_lsn else None,
            begin_wal=base.get("begin_wal"),
            end_wal=base.get("end_wal"),
            size_bytes=_int(base.get("backup_size_bytes") or data.get("cluster_size_bytes")),
            wal_files=_int(wal.get("no_of_files")),
            last_available_wal=wal.get("last_available"),
            copy_time_seconds=float(base["copy_time_seconds"]) if base.get("copy_time_seconds") else None,
            pgdata=data.get("pgdata_directory"),
            system_id=str(data.get("system_id")) if data.get("system_id") else None,
            postgres_version=str(data.get("postgresql_version")) if data.get("postgresql_version") else None,
            backup_method=base.get("backup_method") or data.get("backup_method"),
            tablespaces=tuple(f"{t.get('name')}:{t.get('location')}" if isinstance(t, dict) else str(t)
                              for t in data.get("tablespaces") or ()),
            raw=data,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable view (for XCom and the audit trail)."""
        out = asdict(self)
        out.pop("raw", None)
        out["tablespaces"] = list(self.tablespaces)
        for k, v in out.items():
            if isinstance(v, datetime):
                out[k] = v.isoformat()
        for k in ("begin_lsn", "end_lsn"):
            out[k] = str(getattr(self, k)) if getattr(self, k) else None
        return out


# -------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    hint: str | None


@dataclass(frozen=True)
class CheckReport:
    """`barman -f json check SERVER`: every check with its status and hint."""

    server: str
    checks: tuple[CheckResult, ...]

    @classmethod
    def from_json(cls, payload: Any, server: str) -> CheckReport:
        data = server_section(payload, server, "check")
        if not isinstance(data, dict):
            raise BarmanOutputError(f"check: expected an object for {server!r}")
        checks = []
        for name, result in data.items():
            if not isinstance(result, dict) or "status" not in result:
                raise BarmanOutputError(f"check: entry {name!r} has no status")
            checks.append(CheckResult(name=name, ok=result["status"] == "OK", hint=result.get("hint") or None))
        return cls(server=server, checks=tuple(checks))

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.ok]

    def failed_except(self, ignored: set[str]) -> list[CheckResult]:
        return [c for c in self.failed if c.name not in ignored]

    def to_dict(self) -> dict[str, Any]:
        return {"server": self.server, "ok": self.ok,
                "checks": {c.name: {"ok": c.ok, "hint": c.hint} for c in self.checks}}


# ---------------------------------------------------------------- recovery targets

TARGET_KINDS = ("time", "xid", "lsn", "name", "immediate")


@dataclass(frozen=True)
class RecoveryTarget:
    """Where recovery must stop. Exactly one kind; `value` already validated and normalised."""

    kind: str
    value: str | None
    inclusive: bool = True

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ValidationError("target", self.kind, f"use one of {', '.join(TARGET_KINDS)}")

    @property
    def time(self) -> datetime | None:
        return datetime.fromisoformat(self.value) if self.kind == "time" and self.value else None

    def barman_args(self) -> list[str]:
        """Arguments for `barman restore` (argv elements, never a shell string)."""
        if self.kind == "immediate":
            return ["--target-immediate"]
        args = {"time": "--target-time", "xid": "--target-xid", "lsn": "--target-lsn", "name": "--target-name"}
        out = [args[self.kind], str(self.value)]
        if not self.inclusive:
            out.append("--exclusive")
        return out

    def describe(self) -> str:
        if self.kind == "immediate":
            return "end of the base backup (immediate)"
        return f"{self.kind} {self.value} ({'inclusive' if self.inclusive else 'exclusive'})"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "inclusive": self.inclusive}


# -------------------------------------------------------------------- remote jobs


@dataclass(frozen=True)
class CommandResult:
    """What a remote command did: JSON-serialisable, never base64."""

    host: str
    argv: list[str]
    exit_code: int
    stdout: str
    stderr: str
    duration_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class JobStatus:
    """State of a detached remote job: `running`, `finished` (with exit code) or `absent`."""

    job_id: str
    state: str
    pid: int | None = None
    exit_code: int | None = None

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def finished(self) -> bool:
        return self.state == "finished"

    @property
    def failed(self) -> bool:
        """An earlier attempt that cannot be attached to: lost, or finished with a non-zero exit code."""
        return self.state == "lost" or (self.finished and self.exit_code != 0)


def utc_stamp() -> str:
    """A filesystem-safe UTC timestamp (`20261125T120000Z`) for moved-aside names and kept attempts."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


@dataclass(frozen=True)
class ControlData:
    """The parts of `pg_controldata` a PITR cares about."""

    state: str
    timeline: int
    checkpoint_lsn: Lsn | None
    system_id: str
    raw: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def parse(cls, text: str) -> ControlData:
        raw: dict[str, str] = {}
        for line in text.splitlines():
            if ":" in line:
                k, _, v = line.partition(":")
                raw[k.strip()] = v.strip()
        try:
            lsn = raw.get("Latest checkpoint location")
            return cls(
                state=raw["Database cluster state"],
                timeline=int(raw["Latest checkpoint's TimeLineID"]),
                checkpoint_lsn=Lsn.parse(lsn) if lsn else None,
                system_id=raw["Database system identifier"],
                raw=raw,
            )
        except KeyError as exc:
            raise BarmanOutputError(f"pg_controldata output lacks {exc}") from exc
