"""The PITR request: trigger-form params in, a validated, typed `PitrRequest` out.

Everything a user types passes through `validate_pitr_conf` before any command runs.
Every rejection is a `ValidationError` naming the field, the value and the fix. Values
are checked against strict allow-lists (not deny-lists): a value that is not exactly
the shape we expect never gets near a command line.

Choices made here (also in the trigger form's help texts):
* `target_time` must carry a timezone (`2026-11-25T11:45:00+00:00` or `...Z`); a naive
  time is rejected, not guessed: the UI's date-time picker always sends UTC (`Z`).
* `reason` is free text but limited to printable ASCII letters, digits, spaces and
  `. , : _ - ( ) / # @ + =` (max 500): it is shown in the audit and the DR page.
* `target_name` (a restore point) is any text PostgreSQL accepts as one: up to 63 bytes
  (UTF-8), spaces, quotes and non-ASCII included, taken literally (never stripped). It
  only ever travels as one argv element and is never written into a config file: the
  restore uses the resolved occurrence's LSN (`target_resolution`). When the name was
  created more than once, `target_name_lsn` (an LSN the plan or the refusal lists) picks
  the occurrence.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from barman_dr.exceptions import ValidationError
from barman_dr.inventory import Inventory
from barman_dr.models import Lsn, RecoveryTarget

BACKUP_ID_RE = re.compile(r"^[0-9]{8}T[0-9]{6}\Z")
INCIDENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
#: PostgreSQL's MAXFNAMELEN - 1: a restore point name is at most 63 bytes
RESTORE_POINT_MAX_BYTES = 63
XID_RE = re.compile(r"^[0-9]{1,19}\Z")
LSN_RE = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}\Z")
REASON_RE = re.compile(r"^[A-Za-z0-9 .,:_\-()/#@+=]{0,500}\Z")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")
MAX_JOBS = 16
TARGET_FIELDS = ("target_time", "target_xid", "target_lsn", "target_name", "target_immediate")
KNOWN_FIELDS = {*TARGET_FIELDS, "server", "target_inclusive", "backup_id", "restore_to", "expected", "incident_id",
                "reason", "jobs", "confirm", "staging", "staged_restore", "target_name_lsn", "plan_only", "source"}
#: where the recovered data comes from: a Barman backup + WAL (the default), the server's delayed standby
#: replayed forward to the stop point and promoted, or `auto` (the delayed standby when it has not applied
#: the stop point yet, else Barman), decided by resolve_target once the stop point is known
SOURCES = ("barman", "auto", "delayed_standby")


@dataclass(frozen=True)
class PitrRequest:
    """A validated PITR request. JSON-serialisable through `to_dict` (it travels by XCom)."""

    server: str
    target: RecoveryTarget
    backup_id: str
    restore_to: str
    expected: dict[str, int]
    incident_id: str | None
    reason: str | None
    jobs: int
    confirmed: bool
    staging: bool = False
    #: restore into a staging directory next to the data directory *before* the app is frozen
    staged_restore: bool = True
    requested_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    #: which occurrence of a restore point name created more than once (its record's LSN)
    target_name_lsn: str | None = None
    #: stop after the plan: no approval is asked for, nothing is touched
    plan_only: bool = False
    #: the requested source (SOURCES)
    source: str = "barman"
    #: the source resolve_target chose ("barman" or "delayed_standby"); None before it decided
    source_chosen: str | None = None

    @property
    def from_delayed_standby(self) -> bool:
        """This run recovers by promoting its delayed standby at the stop point (restore_to is that standby)."""
        return self.source_chosen == "delayed_standby"

    @property
    def in_place(self) -> bool:
        return self.restore_to == "in_place"

    def confirm_text(self) -> str:
        return confirm_text(self.server)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target"] = self.target.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PitrRequest:
        t = d["target"]
        known = {f.name for f in fields(cls)}
        # the XCom also carries the step's timing keys (started_at, ...): only the request's own fields count
        return cls(**{k: v for k, v in d.items() if k in known and k != "target"},
                   target=RecoveryTarget(t["kind"], t["value"], bool(t["inclusive"])))


def confirm_text(server: str) -> str:
    return f"PITR {server}"


def _str_field(conf: dict[str, Any], name: str) -> str | None:
    """A string param: None/'' mean absent. Non-strings, NUL and control characters are rejected."""
    value = conf.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValidationError(name, value, "must be a string")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValidationError(name, value, "contains control characters (NUL, newline, ...): remove them")
    if not value.isascii():
        raise ValidationError(name, value, "contains non-ASCII characters: use plain ASCII")
    return value.strip()


def parse_aware_time(value: str, now: datetime, name: str = "target_time") -> datetime:
    """An ISO 8601 time with its timezone, in UTC, not in the future. `name` is the field reported in errors."""
    if len(value) > 40:
        raise ValidationError(name, value, "too long: use ISO 8601 like 2026-11-25T11:45:00+00:00")
    text = value.replace("Z", "+00:00").replace("z", "+00:00")
    if " " in text and "T" not in text:
        text = text.replace(" ", "T", 1)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValidationError(name, value,
                              "not an ISO 8601 date-time: use e.g. 2026-11-25T11:45:00+00:00 (timezone required)") from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise ValidationError(name, value,
                              "has no timezone: add one, e.g. +00:00 or Z (barman-dr never guesses the timezone)")
    try:
        parsed = parsed.astimezone(UTC)
    except OverflowError:
        raise ValidationError(name, value, "is outside the range of dates PostgreSQL can recover to") from None
    if parsed > now:
        raise ValidationError(name, value,
                              f"is in the future (now is {now.isoformat(timespec='seconds')}): pick a time before the incident")
    return parsed


def parse_target_time(value: str, now: datetime) -> datetime:
    return parse_aware_time(value, now, "target_time")


def parse_target(conf: dict[str, Any], now: datetime) -> RecoveryTarget:
    given = []
    for name in TARGET_FIELDS:
        v = conf.get(name)
        if name == "target_immediate":
            if v not in (None, False, True):
                raise ValidationError(name, v, "must be true or false")
            if v is True:
                given.append(name)
        elif v not in (None, ""):
            given.append(name)
    if not given:
        raise ValidationError("target", None, "give exactly one recovery target: target_time, target_xid, target_lsn, "
                                              "target_name or target_immediate")
    if len(given) > 1:
        raise ValidationError(", ".join(given), [conf.get(g) for g in given],
                              "give exactly one recovery target, not several: clear all but one")
    inclusive = conf.get("target_inclusive", True)
    if inclusive is None:
        inclusive = True
    if not isinstance(inclusive, bool):
        raise ValidationError("target_inclusive", inclusive, "must be true or false")
    name = given[0]
    if name == "target_immediate":
        return RecoveryTarget("immediate", None, True)
    if name == "target_name":
        return RecoveryTarget("name", parse_restore_point_name(conf.get(name)), inclusive)
    value = _str_field(conf, name)
    assert value is not None
    if name == "target_time":
        return RecoveryTarget("time", parse_target_time(value, now).isoformat(), inclusive)
    if name == "target_xid":
        if not XID_RE.match(value) or int(value) < 3 or int(value) > 2**64 - 1:
            raise ValidationError(name, value, "must be a transaction id: digits only, 3 or more (e.g. 7312)")
        return RecoveryTarget("xid", str(int(value)), inclusive)
    if not LSN_RE.match(value):
        raise ValidationError(name, value, "must be an LSN like 0/7000028 (hex/hex)")
    return RecoveryTarget("lsn", str(Lsn.parse(value)), inclusive)


def parse_restore_point_name(value: Any) -> str:
    """Any text PostgreSQL accepts as a restore point name, taken literally (not stripped, not re-encoded)."""
    if not isinstance(value, str):
        raise ValidationError("target_name", value, "must be a string: the restore point's name")
    if "\x00" in value:
        raise ValidationError("target_name", value, "contains a NUL character, which no restore point name can hold")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValidationError("target_name", value, "is not valid Unicode text: type the name as created") from None
    if size > RESTORE_POINT_MAX_BYTES:
        raise ValidationError("target_name", value,
                              f"is {size} bytes in UTF-8; PostgreSQL restore point names are at most "
                              f"{RESTORE_POINT_MAX_BYTES} bytes: check the name (pg_create_restore_point refuses longer)")
    return value


def parse_target_name_lsn(conf: dict[str, Any], target: RecoveryTarget) -> str | None:
    """The LSN of the chosen occurrence of a restore point name created more than once (only with target_name)."""
    value = _str_field(conf, "target_name_lsn")
    if value is None:
        return None
    if target.kind != "name":
        raise ValidationError("target_name_lsn", value,
                              "only picks an occurrence of target_name: give target_name too, or use target_lsn")
    if not LSN_RE.match(value):
        raise ValidationError("target_name_lsn", value, "must be an LSN like 0/7000028 (hex/hex), as the plan lists it")
    return str(Lsn.parse(value))


def check_conf_keys(conf: Any, known: set[str]) -> None:
    """A run conf is a JSON object with only known keys (shared by every DR DAG's validator)."""
    if not isinstance(conf, dict):
        raise ValidationError("conf", conf, "the run configuration must be a JSON object")
    unknown = sorted(k for k in conf if k not in known)
    if unknown:
        raise ValidationError(unknown[0], conf[unknown[0]], f"unknown parameter; known: {', '.join(sorted(known))}")


def parse_server(conf: dict[str, Any], inventory: Inventory) -> str:
    server = _str_field(conf, "server")
    if not server or not NAME_RE.match(server) or server not in inventory.servers:
        raise ValidationError("server", conf.get("server"),
                              f"must be one of the inventory's servers: {', '.join(inventory.server_names)}")
    return server


def parse_incident_id(conf: dict[str, Any]) -> str | None:
    incident_id = _str_field(conf, "incident_id")
    if incident_id is not None and not INCIDENT_RE.match(incident_id):
        raise ValidationError("incident_id", incident_id, "letters, digits, '.', '_', '-' only (max 64), e.g. INC-123")
    return incident_id


def parse_reason(conf: dict[str, Any]) -> str | None:
    reason = _str_field(conf, "reason")
    if reason is not None and not REASON_RE.match(reason):
        raise ValidationError("reason", reason, "plain text only: letters, digits, spaces and . , : _ - ( ) / # @ + = "
                                                "(max 500 characters)")
    return reason


def parse_jobs(conf: dict[str, Any]) -> int:
    jobs = conf.get("jobs", 1)
    if jobs is None:
        jobs = 1
    if isinstance(jobs, bool) or not isinstance(jobs, int) or not 1 <= jobs <= MAX_JOBS:
        raise ValidationError("jobs", jobs, f"must be an integer from 1 to {MAX_JOBS}")
    return jobs


def parse_confirm(conf: dict[str, Any], expected_text: str, what: str) -> bool:
    """The typed confirmation: exactly `expected_text` executes, empty plans, anything else is an error.

    A typo must not silently become a plan-only run that the caller thinks executed.
    """
    confirm = conf.get("confirm")
    if confirm not in (None, "") and not isinstance(confirm, str):
        raise ValidationError("confirm", confirm, f"type exactly: {expected_text}")
    confirmed = confirm == expected_text
    if confirm not in (None, "") and not confirmed:
        raise ValidationError("confirm", confirm, f"does not match: type exactly '{expected_text}' to {what}, or leave "
                                                  "it empty to ask a second person to approve the plan")
    return confirmed


def parse_plan_only(conf: dict[str, Any], confirmed: bool) -> bool:
    """`plan_only`: a preview that asks nobody; with a `confirm` it is a contradiction, refused."""
    plan_only = conf.get("plan_only", False)
    if plan_only is None:
        plan_only = False
    if not isinstance(plan_only, bool):
        raise ValidationError("plan_only", plan_only, "must be true (show the plan, ask nobody, touch nothing) or false")
    if plan_only and confirmed:
        raise ValidationError("plan_only", plan_only, "a plan-only run executes nothing: remove `confirm`, or set "
                                                      "plan_only to false to execute")
    return plan_only


def validate_pitr_conf(conf: dict[str, Any], inventory: Inventory, *, now: datetime | None = None) -> PitrRequest:
    """Validate a dr_pitr run conf (the trigger form's params). Pure: no I/O, no clock but `now`."""
    now = now or datetime.now(UTC)
    check_conf_keys(conf, KNOWN_FIELDS)
    server = parse_server(conf, inventory)
    srv = inventory.server(server)

    target = parse_target(conf, now)

    backup_id = _str_field(conf, "backup_id") or "auto"
    if backup_id != "auto" and not BACKUP_ID_RE.match(backup_id):
        raise ValidationError("backup_id", backup_id, "use 'auto' or a Barman backup id like 20261125T020000")

    restore_to = _str_field(conf, "restore_to") or "in_place"
    standbys = [s.name for s in srv.active_standbys]
    if restore_to != "in_place" and restore_to not in standbys:
        spare = " (a spare is built by dr_pitr, never restored onto)" if restore_to in {s.name for s in srv.standbys} \
            else ""
        raise ValidationError("restore_to", restore_to,
                              f"use 'in_place' or a standby of {server}: {', '.join(standbys) or '(none)'}{spare}")
    if restore_to != "in_place" and (blocker := repoint_blocker(srv)):
        raise ValidationError("restore_to", restore_to, f"{blocker}: the app would be left on the fenced "
                                                        f"{srv.primary.name}. Fix: {REPOINT_FIX}, or restore in_place "
                                                        "with source barman")
    source = parse_source(conf, srv, restore_to, target)

    expected_raw = conf.get("expected")
    if expected_raw is None:
        expected_raw = {}
    if not isinstance(expected_raw, dict):
        raise ValidationError("expected", expected_raw, 'must be an object like {"orders_total": 10500}')
    expected: dict[str, int] = {}
    for k, v in expected_raw.items():
        if k not in srv.validation_queries:
            raise ValidationError(f"expected.{k}" if isinstance(k, str) and k.isascii() and len(k) < 64 else "expected",
                                  k, f"unknown validation query; the inventory defines: "
                                     f"{', '.join(sorted(srv.validation_queries)) or '(none)'}")
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValidationError(f"expected.{k}", v, "must be a non-negative integer")
        expected[k] = v

    incident_id = parse_incident_id(conf)
    reason = parse_reason(conf)
    jobs = parse_jobs(conf)

    confirmed = parse_confirm(conf, confirm_text(server), "execute")
    plan_only = parse_plan_only(conf, confirmed)

    staging = conf.get("staging", False)
    if not isinstance(staging, bool):
        raise ValidationError("staging", staging, "must be true or false")

    staged_restore = conf.get("staged_restore", True)
    if staged_restore is None:
        staged_restore = True
    if not isinstance(staged_restore, bool):
        raise ValidationError("staged_restore", staged_restore,
                              "must be true (restore before the freeze, shorter downtime) or false (restore inside "
                              "the downtime window)")

    target_name_lsn = parse_target_name_lsn(conf, target)

    return PitrRequest(server=server, target=target, backup_id=backup_id, restore_to=restore_to, expected=expected,
                       incident_id=incident_id, reason=reason, jobs=jobs, confirmed=confirmed, staging=staging,
                       staged_restore=staged_restore, requested_at=now.isoformat(), target_name_lsn=target_name_lsn,
                       plan_only=plan_only, source=source)


REPOINT_FIX = "give the inventory's app_freeze method pgbouncer with config_file and config_host"


def repoint_blocker(srv: Any) -> str | None:
    """Why this run could not point the app at a standby it recovers onto (None: it can, or nothing manages the app).

    PgBouncer is repointed through its config file on its host; an unfreeze *command* knows nothing
    of the new server. `app_freeze.method none` manages no app: the plan and the report then tell the
    DBA where to point it.
    """
    fr = srv.app_freeze
    if fr.method == "command":
        return "app_freeze.method command cannot point the app at another server"
    if fr.method == "pgbouncer" and not (fr.config_file and fr.config_host):
        return "app_freeze.method pgbouncer has no config_file/config_host to repoint"
    return None


def parse_source(conf: dict[str, Any], srv: Any, restore_to: str, target: RecoveryTarget) -> str:
    """`source`: barman (default), auto or delayed_standby; the delayed standby must exist and be where it restores."""
    source = _str_field(conf, "source") or "barman"
    if source not in SOURCES:
        raise ValidationError("source", source, f"use one of {', '.join(SOURCES)}")
    if source == "barman":
        return source
    delayed = [s.name for s in srv.delayed_standbys]
    if not delayed:
        raise ValidationError("source", source, f"server {srv.name} has no delayed standby in the inventory (a standby "
                                                "with `delayed: <interval>`): use source=barman")
    if source == "delayed_standby" and restore_to != "in_place" and restore_to not in delayed:
        raise ValidationError("restore_to", restore_to,
                              "with source=delayed_standby the recovered server is the delayed standby "
                              f"({', '.join(delayed)}): leave restore_to as in_place, or use source=barman to restore "
                              f"onto {restore_to}")
    if source == "delayed_standby" and (_str_field(conf, "backup_id") or "auto") != "auto":
        raise ValidationError("backup_id", conf.get("backup_id"), "source=delayed_standby copies no backup: leave "
                                                                  "backup_id as auto, or use source=barman or auto")
    if source == "delayed_standby" and (blocker := repoint_blocker(srv)):
        raise ValidationError("source", source, f"the app of {srv.name} cannot be pointed at the promoted standby "
                                                f"({blocker}). Fix: {REPOINT_FIX}, or use source=barman")
    if source == "delayed_standby" and target.kind == "immediate":
        raise ValidationError("source", source, "target_immediate is the end of a base backup: only Barman restores "
                                                "to it. Use source=barman or auto")
    return source
