"""The salvage request: dr_salvage's params in, a validated `SalvageRequest` out (pure, no I/O).

Same rules as the other DR requests (`pitr_request.py`): allow-lists, every rejection a
`ValidationError` naming the field, the value and the fix.

* `server`: from the inventory.
* `pitr_run_id`: the dr_pitr run whose discarded rows to put back; empty means the
  server's last successful dr_pitr (looked up in the audit trail by the validate step).
* `tables`: `schema.table` names; empty means every table with inserts after the target
  (from that run's list of discarded transactions).
* `exclude_xids`: transactions whose rows must not be put back (the plan lists the largest
  discarded transactions). When the PITR targeted a transaction by xid (exclusive: the
  incident itself), that transaction is always excluded.
* `confirm` must equal `SALVAGE <server>` to apply; empty = plan only.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from barman_dr.exceptions import ValidationError
from barman_dr.inventory import Inventory
from barman_dr.params.pitr_request import (
    _str_field,
    check_conf_keys,
    parse_confirm,
    parse_incident_id,
    parse_plan_only,
    parse_reason,
    parse_server,
)
from barman_dr.params.surgical_request import parse_tables

#: Airflow run ids: manual__2026-12-04T05:26:53.594262+00:00, dr_pitr__incident__INC-123, ...
RUN_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:+-]{0,249}\Z")
KNOWN_FIELDS = {"server", "pitr_run_id", "tables", "confirm", "incident_id", "reason", "exclude_xids", "plan_only"}
MAX_EXCLUDED = 1000


def salvage_confirm_text(server: str) -> str:
    return f"SALVAGE {server}"


@dataclass(frozen=True)
class SalvageRequest:
    server: str
    pitr_run_id: str | None
    tables: tuple[str, ...]
    confirmed: bool
    incident_id: str | None
    reason: str | None
    requested_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    exclude_xids: tuple[int, ...] = ()
    plan_only: bool = False

    def confirm_text(self) -> str:
        return salvage_confirm_text(self.server)

    def describe(self) -> str:
        return f"rows discarded by dr_pitr {self.pitr_run_id or '(last successful)'}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tables"] = list(self.tables)
        d["exclude_xids"] = list(self.exclude_xids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SalvageRequest:
        known = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in d.items() if k in known}
        kw["tables"] = tuple(kw.get("tables") or ())
        kw["exclude_xids"] = tuple(int(x) for x in kw.get("exclude_xids") or ())
        return cls(**kw)


def validate_salvage_conf(conf: Any, inventory: Inventory, *, now: datetime | None = None) -> SalvageRequest:
    """Validate a dr_salvage run conf. Pure: no I/O."""
    now = now or datetime.now(UTC)
    check_conf_keys(conf, KNOWN_FIELDS)
    server = parse_server(conf, inventory)
    run_id = _str_field(conf, "pitr_run_id")
    if run_id is not None and not RUN_ID_RE.match(run_id):
        raise ValidationError("pitr_run_id", run_id, "must be a dr_pitr run id as Airflow shows it (letters, digits and "
                                                     "_ . : + -), e.g. dr_pitr__incident__INC-123; or leave it empty for "
                                                     "the server's last successful dr_pitr")
    tables = parse_tables(conf.get("tables"))
    raw = conf.get("exclude_xids")
    if raw in (None, "", []):
        raw = []
    if not isinstance(raw, list) or len(raw) > MAX_EXCLUDED:
        raise ValidationError("exclude_xids", raw, f"must be a list of at most {MAX_EXCLUDED} transaction ids, "
                                                   "e.g. [759] (the plan lists the discarded transactions)")
    excluded = []
    for x in raw:
        text = str(x) if isinstance(x, int) and not isinstance(x, bool) else x
        if not isinstance(text, str) or not text.isdigit() or not 3 <= int(text) < 2**64:
            raise ValidationError("exclude_xids", x, "each entry must be a transaction id (digits, 3 or more)")
        excluded.append(int(text) & 0xFFFFFFFF)  # rows carry 32-bit xmins
    confirmed = parse_confirm(conf, salvage_confirm_text(server), "re-insert the discarded rows")
    return SalvageRequest(server=server, pitr_run_id=run_id, tables=tables, confirmed=confirmed,
                          plan_only=parse_plan_only(conf, confirmed),
                          incident_id=parse_incident_id(conf), reason=parse_reason(conf), requested_at=now.isoformat(),
                          exclude_xids=tuple(excluded))
