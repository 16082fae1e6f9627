"""The dr_find_target request: trigger-form params in, a validated `FindTargetRequest` out.

Same rules as the PITR request (`pitr_request.py`): pure, allow-lists, every rejection a
`ValidationError` naming the field, the value and the fix. Choices:

* `window_start` / `window_end` need a timezone, like `target_time` (never guessed). Both
  empty means the last hour; only `window_end` empty means "until now"; only
  `window_start` empty means the hour before `window_end`.
* The window may not start before the server's recovery window (`retention`): Barman may
  already have removed that WAL, and no PITR could go there anyway.
* `table` is an identifier, optionally schema-qualified (`critical_orders`,
  `public.critical_orders`): letters, digits, `_` and `$`, starting with a letter or `_`,
  max 63 per part. It is compared case-insensitively with the live catalogue's names.
* `min_rows` (default 1) applies to DELETE/UPDATE counts. TRUNCATE and DROP are always
  listed: the WAL does not say how many rows they removed.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any

from barman_dr.exceptions import ValidationError
from barman_dr.inventory import Inventory
from barman_dr.params.pitr_request import _str_field, check_conf_keys, parse_aware_time, parse_incident_id, parse_server

TABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}(\.[A-Za-z_][A-Za-z0-9_$]{0,62})?\Z")
DEFAULT_WINDOW = timedelta(hours=1)
MAX_MIN_ROWS = 2**63 - 1
KNOWN_FIELDS = {"server", "window_start", "window_end", "table", "min_rows", "incident_id"}


@dataclass(frozen=True)
class FindTargetRequest:
    """A validated request. JSON-serialisable through `to_dict` (it travels by XCom)."""

    server: str
    window_start: str
    window_end: str
    table: str | None
    min_rows: int
    incident_id: str | None

    @property
    def start(self) -> datetime:
        return datetime.fromisoformat(self.window_start)

    @property
    def end(self) -> datetime:
        return datetime.fromisoformat(self.window_end)

    @property
    def table_schema(self) -> str | None:
        return self.table.split(".", 1)[0] if self.table and "." in self.table else None

    @property
    def table_name(self) -> str | None:
        return self.table.rsplit(".", 1)[-1] if self.table else None

    def describe(self) -> str:
        return (f"window {self.window_start} .. {self.window_end}"
                + (f", table {self.table}" if self.table else "") + f", min_rows {self.min_rows}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FindTargetRequest:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def validate_find_target_conf(conf: dict[str, Any], inventory: Inventory, *,
                              now: datetime | None = None) -> FindTargetRequest:
    """Validate a dr_find_target run conf. Pure: no I/O, no clock but `now`."""
    now = now or datetime.now(UTC)
    check_conf_keys(conf, KNOWN_FIELDS)
    server = parse_server(conf, inventory)
    srv = inventory.server(server)

    end_text = _str_field(conf, "window_end")
    end = parse_aware_time(end_text, now, "window_end") if end_text else now
    start_text = _str_field(conf, "window_start")
    start = parse_aware_time(start_text, now, "window_start") if start_text else end - DEFAULT_WINDOW
    if start >= end:
        raise ValidationError("window_start", start_text or start.isoformat(),
                              f"must be before window_end ({end.isoformat()}): swap them or widen the window")
    oldest = now - timedelta(days=srv.recovery_window_days)
    if start < oldest:
        raise ValidationError("window_start", start_text,
                              f"is older than {server}'s recovery window ({srv.recovery_window_days} days, i.e. "
                              f"{oldest.isoformat(timespec='seconds')}): Barman may no longer hold that WAL; start later")

    table = _str_field(conf, "table")
    if table is not None and not TABLE_RE.match(table):
        raise ValidationError("table", table, "a table name like critical_orders or public.critical_orders: letters, "
                                              "digits, '_' and '$' (max 63 per part), no quotes")

    min_rows = conf.get("min_rows", 1)
    if min_rows is None:
        min_rows = 1
    if isinstance(min_rows, bool) or not isinstance(min_rows, int) or not 0 <= min_rows <= MAX_MIN_ROWS:
        raise ValidationError("min_rows", min_rows, "must be a non-negative integer (rows deleted or updated)")

    incident_id = parse_incident_id(conf)

    return FindTargetRequest(server=server, window_start=start.isoformat(), window_end=end.isoformat(), table=table,
                             min_rows=min_rows, incident_id=incident_id)
