"""The surgical-recovery request: dr_surgical_recovery's params in, a validated `SurgicalRequest` out.

Same rules as the PITR request (`pitr_request.py`, whose target parsing and field checks
are reused): strict allow-lists, every rejection a `ValidationError` naming the field, the
value and the fix, no I/O. On top:

* `tables`: a list of `schema.table` (each part a plain identifier, taken literally and
  always quoted); empty means the tables the dr_find_target candidate with this
  `target_xid` deleted or updated rows in (looked up by the validate operator in the audit
  trail), else the inventory's `surgical_tables` of the server.
* `restore_changed` (default false): also put back the restored version of rows that
  differ in live. Off, they are only reported.
* `confirm` must equal `SURGICAL <server>`; empty = plan only.
* the server must have a `nonprod` instance: the restore goes there, never onto live.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from barman_dr.exceptions import ValidationError
from barman_dr.inventory import QUALIFIED_TABLE_RE, Inventory
from barman_dr.models import RecoveryTarget
from barman_dr.params.pitr_request import (
    BACKUP_ID_RE,
    TARGET_FIELDS,
    PitrRequest,
    _str_field,
    check_conf_keys,
    parse_confirm,
    parse_incident_id,
    parse_jobs,
    parse_plan_only,
    parse_reason,
    parse_server,
    parse_target,
)

MAX_TABLES = 20
KNOWN_FIELDS = {*TARGET_FIELDS, "server", "target_inclusive", "backup_id", "tables", "restore_changed", "incident_id",
                "reason", "jobs", "confirm", "plan_only"}


def surgical_confirm_text(server: str) -> str:
    return f"SURGICAL {server}"


@dataclass(frozen=True)
class SurgicalRequest(PitrRequest):
    """A validated surgical-recovery request; `restore_to` is the server's nonprod instance."""

    tables: tuple[str, ...] = ()
    #: where `tables` came from: "param", "dr_find_target" (the found transaction's tables) or "inventory"
    tables_source: str = "param"
    restore_changed: bool = False

    def confirm_text(self) -> str:
        return surgical_confirm_text(self.server)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SurgicalRequest:
        req = super().from_dict(d)
        assert isinstance(req, SurgicalRequest)
        object.__setattr__(req, "tables", tuple(req.tables))
        return req


def parse_tables(value: Any) -> tuple[str, ...]:
    """A list of `schema.table` names, deduplicated in order; None/[] mean "not given"."""
    if value in (None, "", []):
        return ()
    if not isinstance(value, list):
        raise ValidationError("tables", value, 'must be a list of "schema.table" names, e.g. ["public.critical_orders"]')
    if len(value) > MAX_TABLES:
        raise ValidationError("tables", f"{len(value)} tables", f"at most {MAX_TABLES} tables per run: split the run")
    out: list[str] = []
    for v in value:
        if not isinstance(v, str) or not QUALIFIED_TABLE_RE.match(v):
            raise ValidationError("tables", v, 'each entry must be "schema.table" (letters, digits, _ and $ in each '
                                               'part; names are taken literally, case-sensitive), e.g. '
                                               '"public.critical_orders"')
        if v not in out:
            out.append(v)
    return tuple(out)


def validate_surgical_conf(conf: dict[str, Any], inventory: Inventory, *, now: datetime | None = None) -> SurgicalRequest:
    """Validate a dr_surgical_recovery run conf. Pure: no I/O, no clock but `now`."""
    now = now or datetime.now(UTC)
    check_conf_keys(conf, KNOWN_FIELDS)
    server = parse_server(conf, inventory)
    srv = inventory.server(server)
    if srv.nonprod is None:
        raise ValidationError("server", server, "has no `nonprod` instance in the inventory: surgical recovery restores "
                                                "there, next to the live primary. Add one, or use dr_pitr")

    target: RecoveryTarget = parse_target(conf, now)

    backup_id = _str_field(conf, "backup_id") or "auto"
    if backup_id != "auto" and not BACKUP_ID_RE.match(backup_id):
        raise ValidationError("backup_id", backup_id, "use 'auto' or a Barman backup id like 20261125T020000")

    tables = parse_tables(conf.get("tables"))
    source = "param"
    if not tables:
        tables, source = srv.surgical_tables, "inventory"
    if not tables:
        raise ValidationError("tables", conf.get("tables"),
                              f'name the tables to repair, e.g. ["public.critical_orders"], or set surgical_tables for '
                              f"{server} in the inventory")

    restore_changed = conf.get("restore_changed", False)
    if restore_changed is None:
        restore_changed = False
    if not isinstance(restore_changed, bool):
        raise ValidationError("restore_changed", restore_changed, "must be true or false")

    incident_id = parse_incident_id(conf)
    reason = parse_reason(conf)
    jobs = parse_jobs(conf)

    confirmed = parse_confirm(conf, surgical_confirm_text(server), "apply the diff to live")
    plan_only = parse_plan_only(conf, confirmed)

    return SurgicalRequest(server=server, target=target, backup_id=backup_id, restore_to=srv.nonprod.name, expected={},
                           incident_id=incident_id, reason=reason, jobs=jobs, confirmed=confirmed, staging=False,
                           requested_at=now.isoformat(), tables=tables, tables_source=source,
                           restore_changed=restore_changed, plan_only=plan_only)
