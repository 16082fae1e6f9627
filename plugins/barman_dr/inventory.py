"""The server inventory: every Barman server barman-dr manages, as typed data.

The inventory is a YAML file (`include/inventory/*.yaml`, chosen by the environment
variable BARMAN_DR_INVENTORY). DAG files read it at parse time to build params and mapped
tasks, so loading it must stay cheap and do no network I/O. `${VAR}` references are
expanded from the environment (the lab uses ${LAB_DIR}); an unset variable is an error,
not an empty string, so a path can never silently collapse to `/pg/data`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from barman_dr.exceptions import InventoryError

DEFAULT_INVENTORY = Path(__file__).resolve().parents[2] / "include" / "inventory" / "lab.yaml"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")
#: `schema.table`, each part a plain SQL identifier (taken literally: quoted, case-sensitive, never parsed further)
#: an Airflow user name, or `role:<role>`
APPROVER_RE = re.compile(r"^(role:)?[A-Za-z0-9][A-Za-z0-9._@-]{0,127}\Z")
QUALIFIED_TABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}\.[A-Za-z_][A-Za-z0-9_$]{0,62}\Z")
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
FREEZE_METHODS = ("pgbouncer", "command", "none")


def _expand(value: Any, where: str, env: dict[str, str]) -> Any:
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in env:
                raise InventoryError(f"{where}: environment variable ${{{name}}} is not set")
            return env[name]

        return _VAR_RE.sub(sub, value)
    if isinstance(value, list):
        return [_expand(v, f"{where}[{i}]", env) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}", env) for k, v in value.items()}
    return value


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise InventoryError(f"{where}: {value!r} is not a valid name (letters, digits, '.', '_', '-'; max 63)")
    return value


def _abs_path(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\x00" in value or "\n" in value:
        raise InventoryError(f"{where}: {value!r} must be an absolute path")
    return value


def _argv(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise InventoryError(f"{where}: must be a non-empty list of strings (an argv, not a shell string)")
    return tuple(value)


@dataclass(frozen=True)
class BarmanHost:
    name: str
    address: str
    ssh_conn_id: str
    barman_command: tuple[str, ...]
    job_dir: str
    backup_directory: str
    pool_slots: int = 4
    #: Celery queue of the workers beside this host: every task that runs Barman or SSH for one
    #: of its servers is routed there (LocalExecutor ignores queues)
    queue: str = "default"

    @property
    def pool(self) -> str:
        """Airflow pool bounding concurrent barman commands on this host."""
        return f"barman_{self.name.replace('-', '_').replace('.', '_')}"


@dataclass(frozen=True)
class DbHost:
    name: str
    address: str
    ssh_conn_id: str
    pg_bin: str
    job_dir: str
    restore_ssh_command: tuple[str, ...]


@dataclass(frozen=True)
class Instance:
    """A PostgreSQL instance (primary, standby or non-prod target) on a db host."""

    name: str
    host: str
    data_directory: str
    port: int
    socket_directory: str
    log_file: str
    postgres_conn_id: str
    replication_slot: str | None = None
    #: a delayed standby (`delayed: <interval>`): PostgreSQL's recovery_min_apply_delay, in seconds
    apply_delay_s: int | None = None
    #: how far past its delay a delayed standby may fall before the verification says so (seconds)
    delay_tolerance_s: int | None = None
    #: a standby's fallback to Barman's archive (e.g. `barman-wal-restore ... %f %p`), written by its rebuild
    restore_command: str | None = None
    #: a spare delayed standby (`spare: true`): not run day to day; dr_pitr builds it as the new delayed
    #: standby when the one it protects is promoted (the delayed-standby source, or restore_to onto it)
    spare: bool = False

    @property
    def delayed(self) -> bool:
        return bool(self.apply_delay_s)


#: `delayed:` / `delay_tolerance:` values: an integer number of seconds, or a number and a unit
INTERVAL_RE = re.compile(r"^\s*(\d+)\s*([a-z]*)\s*$")
#: recovery_min_apply_delay is an int of milliseconds
MAX_INTERVAL_S = 2147483
_UNIT_S = {"": 1, "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1, "min": 60, "mins": 60, "minute": 60,
           "minutes": 60, "h": 3600, "hour": 3600, "hours": 3600, "d": 86400, "day": 86400, "days": 86400}


def parse_interval(value: Any, where: str) -> int:
    """`90`, `"30s"`, `"5min"`, `"4h"`, `"1d"` -> seconds; anything else names the field and the fix."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        value = str(value)
    m = INTERVAL_RE.match(value) if isinstance(value, str) else None
    if not m or int(m.group(1)) <= 0 or m.group(2) not in _UNIT_S:
        raise InventoryError(f"{where}: {value!r} is not a positive interval. Fix: seconds (e.g. 3600) or a number "
                             "with a unit: 30s, 5min, 4h, 1d")
    seconds = int(m.group(1)) * _UNIT_S[m.group(2)]
    if seconds > MAX_INTERVAL_S:
        raise InventoryError(f"{where}: {value!r} is longer than PostgreSQL's recovery_min_apply_delay allows "
                             f"({MAX_INTERVAL_S} s, about 24 days). Fix: a shorter interval, e.g. 7d")
    return seconds


@dataclass(frozen=True)
class AppFreeze:
    method: str
    conn_id: str | None = None
    database: str | None = None
    timeout_seconds: int = 30
    freeze_command: tuple[str, ...] | None = None
    unfreeze_command: tuple[str, ...] | None = None
    #: Postgres connection the application uses (through PgBouncer): proves app connectivity
    app_conn_id: str | None = None
    #: pgbouncer.ini and the db host it lives on: repointed when restore_to is a standby
    config_file: str | None = None
    config_host: str | None = None


@dataclass(frozen=True)
class Replication:
    """How standbys connect to the primary (rebuilding them after a PITR)."""

    user: str
    passfile: str


@dataclass(frozen=True)
class Server:
    """One Barman server (one PostgreSQL cluster protected by Barman)."""

    name: str
    description: str
    barman_host: str
    database: str
    primary: Instance
    standbys: tuple[Instance, ...]
    nonprod: Instance | None
    app_freeze: AppFreeze
    recovery_window_days: int
    minimum_redundancy: int
    verification: dict[str, float]
    rto_objective_seconds: int
    validation_queries: dict[str, str]
    replication: Replication | None = None
    #: how long `switch-wal --archive` may wait for Barman to receive the closed WAL
    switch_wal_timeout_seconds: int = 60
    #: tables (`schema.table`) dr_surgical_recovery compares when its run names none
    surgical_tables: tuple[str, ...] = ()
    #: the longest the app may stay frozen by a DR run before dr_freeze_guard alerts (never unfreezes)
    max_freeze_seconds: int = 1800
    #: four-eyes: true ignores `confirm`, every destructive run waits for a second person
    require_approval: bool = False
    #: who may approve: Airflow user names, or `role:<name>` (every user of that role); never the requester
    approvers: tuple[str, ...] = ()
    #: how long a run waits for the approval before it ends with nothing touched
    approval_timeout_seconds: int = 1800

    @property
    def active_standbys(self) -> tuple[Instance, ...]:
        """The standbys that run day to day (a spare is built only when a delayed standby is promoted)."""
        return tuple(s for s in self.standbys if not s.spare)

    @property
    def delayed_standbys(self) -> tuple[Instance, ...]:
        """The delayed standbys that run day to day: the recovery sources and the protected window."""
        return tuple(s for s in self.active_standbys if s.delayed)

    def standby(self, name: str) -> Instance:
        for s in self.standbys:
            if s.name == name:
                return s
        raise InventoryError(f"server {self.name!r} has no standby named {name!r}")


@dataclass(frozen=True)
class Worker:
    """A Celery worker of the deployment (`workers:`): the lab starts these, compose mirrors them."""

    name: str
    queues: tuple[str, ...]
    concurrency: int = 4


@dataclass(frozen=True)
class Inventory:
    path: str
    barman_hosts: dict[str, BarmanHost]
    db_hosts: dict[str, DbHost]
    servers: dict[str, Server] = field(default_factory=dict)
    workers: dict[str, Worker] = field(default_factory=dict)

    def queue_of(self, server: str | Server) -> str:
        """The Celery queue for tasks that run Barman or SSH for `server` (its barman host's)."""
        return self.barman_host_of(server).queue

    @property
    def queues(self) -> list[str]:
        """Every queue a task may be sent to: `default` plus each barman host's."""
        return sorted({"default", *(h.queue for h in self.barman_hosts.values())})

    def server(self, name: str) -> Server:
        try:
            return self.servers[name]
        except KeyError:
            raise InventoryError(f"unknown server {name!r}; known: {', '.join(sorted(self.servers))}") from None

    def barman_host_of(self, server: str | Server) -> BarmanHost:
        srv = server if isinstance(server, Server) else self.server(server)
        return self.barman_hosts[srv.barman_host]

    def db_host(self, name: str) -> DbHost:
        try:
            return self.db_hosts[name]
        except KeyError:
            raise InventoryError(f"unknown db host {name!r}") from None

    @property
    def server_names(self) -> list[str]:
        return sorted(self.servers)


def _instance(data: dict[str, Any], where: str, db_hosts: dict[str, DbHost], standby: bool = False) -> Instance:
    if not standby and (data.get("delayed") is not None or data.get("delay_tolerance") is not None):
        raise InventoryError(f"{where}.delayed: only a standby can be delayed. Fix: move `delayed` to an entry of "
                             "`standbys`")
    host = _name(data.get("host"), f"{where}.host")
    if host not in db_hosts:
        raise InventoryError(f"{where}.host: {host!r} is not in db_hosts")
    port = data.get("port", 5432)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InventoryError(f"{where}.port: {port!r} is not a TCP port")
    return Instance(
        name=_name(data.get("name", host), f"{where}.name"),
        host=host,
        data_directory=_abs_path(data.get("data_directory"), f"{where}.data_directory"),
        port=port,
        socket_directory=_abs_path(data.get("socket_directory", "/var/run/postgresql"), f"{where}.socket_directory"),
        log_file=_abs_path(data.get("log_file"), f"{where}.log_file"),
        postgres_conn_id=_name(data.get("postgres_conn_id"), f"{where}.postgres_conn_id"),
        replication_slot=data.get("replication_slot"),
        restore_command=_restore_command(data.get("restore_command"), f"{where}.restore_command", standby),
        spare=_spare(data, where, standby),
        **_delay(data, where),
    )


def _spare(data: dict[str, Any], where: str, standby: bool) -> bool:
    value = data.get("spare", False)
    if not isinstance(value, bool):
        raise InventoryError(f"{where}.spare: {value!r} must be true or false")
    if value and not (standby and data.get("delayed") is not None):
        raise InventoryError(f"{where}.spare: only a delayed standby can be a spare (dr_pitr builds it when the "
                             "delayed standby is promoted). Fix: add `delayed: <interval>` to it, or remove `spare`")
    return value


def _restore_command(value: Any, where: str, standby: bool) -> str | None:
    if value is None:
        return None
    if not standby:
        raise InventoryError(f"{where}: only a standby has one (the rebuild writes it). Fix: remove it")
    if not isinstance(value, str) or not value.strip() or any(c in value for c in "\n\r\0\\") or "%f" not in value \
            or "%p" not in value:
        raise InventoryError(f"{where}: {value!r} must be one line with %f and %p and no backslash, e.g. "
                             "\"barman-wal-restore -U barman barman-host pg-primary %f %p\"")
    return value


def _delay(data: dict[str, Any], where: str) -> dict[str, int | None]:
    """A standby's `delayed` and `delay_tolerance` (default: a tenth of the delay, at least 60 s)."""
    if data.get("delayed") is None:
        if data.get("delay_tolerance") is not None:
            raise InventoryError(f"{where}.delay_tolerance: set only on a delayed standby. Fix: add `delayed: <interval>`"
                                 " or remove it")
        return {}
    delay = parse_interval(data["delayed"], f"{where}.delayed")
    tol = data.get("delay_tolerance")
    return {"apply_delay_s": delay,
            "delay_tolerance_s": parse_interval(tol, f"{where}.delay_tolerance") if tol is not None
            else max(60, delay // 10)}


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InventoryError(f"{where}: {value!r} is not a positive integer (seconds), e.g. 1800")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise InventoryError(f"{where}: {value!r} must be true or false")
    return value


def _approvers(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and APPROVER_RE.match(v) for v in value):
        raise InventoryError(f"{where}: {value!r} must be a list of Airflow user names or `role:<role>` entries "
                             "(letters, digits, . _ @ -), e.g. [alice, role:op]")
    return tuple(dict.fromkeys(value))


def _approval_timeout(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 7 * 24 * 60:
        raise InventoryError(f"{where}: {value!r} must be minutes between 0 and 10080 (a week), e.g. 30")
    return max(1, round(value * 60))


def _tables(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and QUALIFIED_TABLE_RE.match(v) for v in value):
        raise InventoryError(f"{where}: {value!r} must be a list of `schema.table` names (letters, digits, '_', '$'), "
                             "e.g. [public.critical_orders]")
    return tuple(dict.fromkeys(value))


def _db_host_ref(value: Any, where: str, db_hosts: dict[str, DbHost]) -> str | None:
    if value is None:
        return None
    if value not in db_hosts:
        raise InventoryError(f"{where}: {value!r} is not in db_hosts")
    return str(value)


_QUEUE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def _queue(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _QUEUE_RE.match(value):
        raise InventoryError(f"{where}: {value!r} is not a valid Celery queue name (letters, digits, '.', '_', '-'; "
                             "max 63), e.g. barman-site-a")
    if value == "barman-dr-site":  # barman_dr.routing.SITE_QUEUE: a placeholder no worker may serve
        raise InventoryError(f"{where}: {value!r} is reserved by barman-dr (the routing placeholder); choose another")
    return value


def _workers(value: Any, barman_hosts: dict[str, BarmanHost]) -> dict[str, Worker]:
    """`workers:` {name: {queues: [...], concurrency: N}}; when present, every queue a task may be
    routed to must be served by one of them, so a typo fails at load time instead of leaving a
    PITR step queued until `task_queued_timeout`."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not value:
        raise InventoryError("workers: must be a mapping {worker name: {queues: [...]}}, e.g. "
                             "{worker-a: {queues: [default, barman-site-a]}}")
    out: dict[str, Worker] = {}
    for name, entry in value.items():
        w = f"workers.{name}"
        d = entry if isinstance(entry, dict) else {}
        queues = d.get("queues")
        if not isinstance(queues, list) or not queues:
            raise InventoryError(f"{w}.queues: {queues!r} must be a non-empty list of queue names, e.g. [default]")
        conc = d.get("concurrency", 4)
        if not isinstance(conc, int) or isinstance(conc, bool) or not 1 <= conc <= 64:
            raise InventoryError(f"{w}.concurrency: {conc!r} must be an integer between 1 and 64, e.g. 4")
        out[_name(name, w)] = Worker(name=name, queues=tuple(_queue(q, f"{w}.queues") for q in queues),
                                     concurrency=conc)
    served = {q for wk in out.values() for q in wk.queues}
    if "default" not in served:
        raise InventoryError("workers: no worker serves the `default` queue; add `default` to one worker's queues")
    for h in barman_hosts.values():
        if h.queue not in served:
            raise InventoryError(f"barman_hosts.{h.name}.queue: {h.queue!r} is not served by any worker "
                                 f"(served: {', '.join(sorted(served))}); fix the name or add it to a worker's queues")
    return out


def parse_inventory(raw: dict[str, Any], path: str = "<memory>", env: dict[str, str] | None = None) -> Inventory:
    """Validate and type a parsed inventory document."""
    if not isinstance(raw, dict) or raw.get("version") != 1:
        raise InventoryError(f"{path}: expected a mapping with `version: 1`")
    raw = _expand(raw, path, dict(os.environ) if env is None else env)
    barman_hosts: dict[str, BarmanHost] = {}
    for name, d in (raw.get("barman_hosts") or {}).items():
        w = f"barman_hosts.{name}"
        barman_hosts[_name(name, w)] = BarmanHost(
            name=name,
            address=str(d.get("address", "")),
            ssh_conn_id=_name(d.get("ssh_conn_id"), f"{w}.ssh_conn_id"),
            barman_command=_argv(d.get("barman_command", ["barman"]), f"{w}.barman_command"),
            job_dir=_abs_path(d.get("job_dir", "/var/lib/barman/barman-dr-jobs"), f"{w}.job_dir"),
            backup_directory=_abs_path(d.get("backup_directory", "/var/lib/barman"), f"{w}.backup_directory"),
            pool_slots=int(d.get("pool_slots", 4)),
            queue=_queue(d.get("queue", "default"), f"{w}.queue"),
        )
    workers = _workers(raw.get("workers"), barman_hosts)
    db_hosts: dict[str, DbHost] = {}
    for name, d in (raw.get("db_hosts") or {}).items():
        w = f"db_hosts.{name}"
        db_hosts[_name(name, w)] = DbHost(
            name=name,
            address=str(d.get("address", "")),
            ssh_conn_id=_name(d.get("ssh_conn_id"), f"{w}.ssh_conn_id"),
            pg_bin=_abs_path(d.get("pg_bin", "/usr/lib/postgresql/15/bin"), f"{w}.pg_bin"),
            job_dir=_abs_path(d.get("job_dir", "/var/lib/postgresql/barman-dr-jobs"), f"{w}.job_dir"),
            restore_ssh_command=_argv(d.get("restore_ssh_command"), f"{w}.restore_ssh_command"),
        )
    servers: dict[str, Server] = {}
    for name, d in (raw.get("servers") or {}).items():
        w = f"servers.{name}"
        _name(name, w)
        bh = d.get("barman_host")
        if bh not in barman_hosts:
            raise InventoryError(f"{w}.barman_host: {bh!r} is not in barman_hosts")
        freeze = d.get("app_freeze") or {"method": "none"}
        if freeze.get("method") not in FREEZE_METHODS:
            raise InventoryError(f"{w}.app_freeze.method: use one of {FREEZE_METHODS}")
        retention = d.get("retention") or {}
        queries = d.get("validation_queries") or {}
        for q in queries:
            _name(q, f"{w}.validation_queries")
        servers[name] = Server(
            name=name,
            description=str(d.get("description", "")),
            barman_host=bh,
            database=_name(d.get("database"), f"{w}.database"),
            primary=_instance(d.get("primary") or {}, f"{w}.primary", db_hosts),
            standbys=tuple(_instance(s, f"{w}.standbys[{i}]", db_hosts, standby=True)
                           for i, s in enumerate(d.get("standbys") or [])),
            nonprod=_instance(d["nonprod"], f"{w}.nonprod", db_hosts) if d.get("nonprod") else None,
            app_freeze=AppFreeze(
                method=freeze["method"],
                conn_id=freeze.get("conn_id"),
                database=freeze.get("database"),
                timeout_seconds=int(freeze.get("timeout_seconds", 30)),
                freeze_command=_argv(freeze["freeze_command"], f"{w}.app_freeze.freeze_command")
                if freeze.get("freeze_command") else None,
                unfreeze_command=_argv(freeze["unfreeze_command"], f"{w}.app_freeze.unfreeze_command")
                if freeze.get("unfreeze_command") else None,
                app_conn_id=_name(freeze["app_conn_id"], f"{w}.app_freeze.app_conn_id") if freeze.get("app_conn_id") else None,
                config_file=_abs_path(freeze["config_file"], f"{w}.app_freeze.config_file")
                if freeze.get("config_file") else None,
                config_host=_db_host_ref(freeze.get("config_host"), f"{w}.app_freeze.config_host", db_hosts),
            ),
            replication=Replication(
                user=_name(d["replication"].get("user"), f"{w}.replication.user"),
                passfile=_abs_path(d["replication"].get("passfile"), f"{w}.replication.passfile"),
            ) if d.get("replication") else None,
            recovery_window_days=int(retention.get("recovery_window_days", 7)),
            minimum_redundancy=int(retention.get("minimum_redundancy", 1)),
            verification={k: float(v) for k, v in (d.get("verification") or {}).items()},
            rto_objective_seconds=int(d.get("rto_objective_seconds", 900)),
            validation_queries=dict(queries),
            switch_wal_timeout_seconds=int(d.get("switch_wal_timeout_seconds", 60)),
            surgical_tables=_tables(d.get("surgical_tables"), f"{w}.surgical_tables"),
            max_freeze_seconds=_positive_int(d.get("max_freeze_seconds", 1800), f"{w}.max_freeze_seconds"),
            require_approval=_bool(d.get("require_approval", False), f"{w}.require_approval"),
            approvers=_approvers(d.get("approvers"), f"{w}.approvers"),
            approval_timeout_seconds=_approval_timeout(d.get("approval_timeout_minutes", 30),
                                                       f"{w}.approval_timeout_minutes"),
        )
    if not servers:
        raise InventoryError(f"{path}: no servers defined")
    return Inventory(path=path, barman_hosts=barman_hosts, db_hosts=db_hosts, servers=servers, workers=workers)


def inventory_path() -> Path:
    return Path(os.environ.get("BARMAN_DR_INVENTORY") or DEFAULT_INVENTORY)


@lru_cache(maxsize=4)
def _load_cached(path: str, mtime: float, env_key: tuple[tuple[str, str], ...]) -> Inventory:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise InventoryError(f"cannot read inventory {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise InventoryError(f"inventory {path} is not valid YAML: {exc}") from exc
    return parse_inventory(raw, path, dict(env_key))


def load_inventory(path: str | Path | None = None) -> Inventory:
    """Load (and cache by path + mtime + environment) the inventory."""
    p = Path(path) if path else inventory_path()
    try:
        mtime = p.stat().st_mtime
    except OSError as exc:
        raise InventoryError(f"inventory not found: {p} (set BARMAN_DR_INVENTORY)") from exc
    env_key = tuple(sorted((k, v) for k, v in os.environ.items() if k in _referenced_vars(p)))
    return _load_cached(str(p), mtime, env_key)


@lru_cache(maxsize=8)
def _referenced_vars(p: Path) -> frozenset[str]:
    try:
        return frozenset(_VAR_RE.findall(p.read_text()))
    except OSError:
        return frozenset()


def server_names_for_dags(path: str | Path | None = None) -> list[str]:
    """Server names for DAG params; never raises at parse time (a broken inventory must not hide DAGs).

    When LAB_DIR-style variables are unset (for example in a DagBag test), names are read
    without expansion: names never contain `${...}`.
    """
    p = Path(path) if path else inventory_path()
    try:
        raw = yaml.safe_load(p.read_text()) or {}
        return sorted((raw.get("servers") or {}).keys())
    except (OSError, yaml.YAMLError, AttributeError):
        return []


def standby_names_for_dags(path: str | Path | None = None) -> list[str]:
    """Every standby name in the inventory but the spares (for the `restore_to` param); never raises."""
    p = Path(path) if path else inventory_path()
    try:
        raw = yaml.safe_load(p.read_text()) or {}
        names = {sb.get("name") or sb.get("host") for srv in (raw.get("servers") or {}).values()
                 for sb in (srv.get("standbys") or []) if isinstance(sb, dict) and sb.get("spare") is not True}
        return sorted(n for n in names if isinstance(n, str))
    except (OSError, yaml.YAMLError, AttributeError):
        return []
