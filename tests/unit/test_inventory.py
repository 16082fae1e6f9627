"""The server inventory: the lab's YAML with its ${VAR}s, and every way a broken one is refused."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from barman_dr.exceptions import InventoryError
from barman_dr.inventory import (
    DEFAULT_INVENTORY,
    Inventory,
    load_inventory,
    parse_inventory,
    server_names_for_dags,
)

LAB_YAML = Path(__file__).resolve().parents[2] / "include" / "inventory" / "lab.yaml"
ENV = {"LAB_DIR": "/var/tmp/lab-x", "LAB_NET": "127.0.77"}


@pytest.fixture
def raw() -> dict:
    return yaml.safe_load(LAB_YAML.read_text())


@pytest.fixture
def inv(raw) -> Inventory:
    return parse_inventory(raw, str(LAB_YAML), ENV)


def test_default_inventory_is_the_lab_yaml():
    assert DEFAULT_INVENTORY == LAB_YAML
    assert LAB_YAML.exists()


def test_lab_inventory_parses(inv):
    assert inv.server_names == ["pg-primary", "pg-primary2"]
    second = inv.server("pg-primary2")
    assert second.barman_host == "barman-lab2" and second.standbys == () and second.nonprod is None
    assert second.primary.postgres_conn_id == "pg_primary2"
    srv = inv.server("pg-primary")
    assert srv.database == "shop"
    assert srv.barman_host == "barman-lab"
    assert srv.primary.host == "pg-primary"
    assert srv.primary.data_directory == "/var/tmp/lab-x/pg/pg-primary/data"
    assert srv.primary.port == 5432
    assert srv.primary.socket_directory == "/var/tmp/lab-x/run/pg-primary"
    assert srv.primary.postgres_conn_id == "pg_primary"
    assert [s.name for s in srv.standbys] == ["pg-standby", "pg-delayed", "pg-delayed2"]
    assert srv.standby("pg-standby").replication_slot == "pg_standby"
    assert not srv.standby("pg-standby").delayed
    delayed = srv.standby("pg-delayed")
    assert (delayed.host, delayed.port, delayed.apply_delay_s, delayed.delay_tolerance_s) == ("pg-standby", 5433, 180, 60)
    assert delayed.restore_command == "/var/tmp/lab-x/bin/barman-wal-restore -U barman barman-lab pg-primary %f %p"
    assert srv.nonprod is not None and srv.nonprod.host == "pg-nonprod"
    assert srv.app_freeze.method == "pgbouncer"
    assert srv.app_freeze.conn_id == "pgbouncer_admin" and srv.app_freeze.database == "shop"
    assert srv.app_freeze.timeout_seconds == 30
    assert srv.minimum_redundancy == 2 and srv.recovery_window_days == 7
    assert srv.verification["max_backup_age_hours"] == 170.0
    assert srv.rto_objective_seconds == 900
    assert set(srv.validation_queries) == {"orders_total", "orders_completed"}


def test_lab_inventory_hosts(inv):
    bh = inv.barman_host_of("pg-primary")
    assert bh.address == "127.0.77.2"
    assert bh.ssh_conn_id == "barman_host"
    assert bh.barman_command == ("/var/tmp/lab-x/bin/barman",)
    assert bh.job_dir == "/var/tmp/lab-x/hosts/barman-lab/jobs"
    assert bh.pool == "barman_barman_lab"
    assert bh.pool_slots == 4
    assert set(inv.db_hosts) == {"pg-primary", "pg-standby", "pg-nonprod", "pg-primary2"}
    st = inv.db_host("pg-standby")
    assert st.address == "127.0.77.12" and st.ssh_conn_id == "pg_standby_ssh"
    assert st.pg_bin == "/usr/lib/postgresql/15/bin"
    assert isinstance(st.restore_ssh_command, tuple)
    assert st.restore_ssh_command == ("ssh", "-F", "/var/tmp/lab-x/ssh/barman_ssh_config", "postgres@pg-standby")


def test_no_unexpanded_variables_left(inv):
    def walk(v):
        if isinstance(v, str):
            assert "${" not in v, v
        elif isinstance(v, (tuple, list)):
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif hasattr(v, "__dataclass_fields__"):
            for f in v.__dataclass_fields__:
                walk(getattr(v, f))
    walk(inv)


def test_unknown_lookups(inv):
    with pytest.raises(InventoryError, match="unknown server 'nope'"):
        inv.server("nope")
    with pytest.raises(InventoryError, match="unknown db host"):
        inv.db_host("nope")
    with pytest.raises(InventoryError, match="no standby named"):
        inv.server("pg-primary").standby("nope")


def test_load_inventory_with_env(monkeypatch):
    monkeypatch.setenv("LAB_DIR", "/srv/lab-y")
    monkeypatch.setenv("LAB_NET", "127.0.88")
    monkeypatch.delenv("BARMAN_DR_INVENTORY", raising=False)
    inv = load_inventory()
    assert inv.path == str(LAB_YAML)
    assert inv.server("pg-primary").primary.data_directory == "/srv/lab-y/pg/pg-primary/data"
    # the cache is keyed by the environment: another LAB_DIR gives another inventory
    monkeypatch.setenv("LAB_DIR", "/srv/lab-z")
    assert load_inventory().server("pg-primary").primary.data_directory == "/srv/lab-z/pg/pg-primary/data"


def test_load_inventory_unset_variable(monkeypatch):
    monkeypatch.delenv("LAB_DIR", raising=False)
    monkeypatch.setenv("LAB_NET", "127.0.88")
    with pytest.raises(InventoryError, match=r"\$\{LAB_DIR\} is not set"):
        load_inventory(LAB_YAML)


def test_load_inventory_missing_file(tmp_path):
    with pytest.raises(InventoryError, match="not found"):
        load_inventory(tmp_path / "nope.yaml")


def test_load_inventory_invalid_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("version: 1\nservers: [unclosed\n")
    with pytest.raises(InventoryError, match="not valid YAML"):
        load_inventory(p)


def test_barman_dr_inventory_env_var(monkeypatch, tmp_path, raw):
    p = tmp_path / "inv.yaml"
    p.write_text(LAB_YAML.read_text())
    monkeypatch.setenv("BARMAN_DR_INVENTORY", str(p))
    monkeypatch.setenv("LAB_DIR", "/srv/lab-y")
    monkeypatch.setenv("LAB_NET", "127.0.88")
    assert load_inventory().path == str(p)
    assert server_names_for_dags() == ["pg-primary", "pg-primary2"]


def test_server_names_for_dags_never_raises(tmp_path, monkeypatch):
    monkeypatch.delenv("LAB_DIR", raising=False)
    assert server_names_for_dags(LAB_YAML) == ["pg-primary", "pg-primary2"]
    assert server_names_for_dags(tmp_path / "missing.yaml") == []
    bad = tmp_path / "bad.yaml"
    bad.write_text(": : :\n  - [")
    assert server_names_for_dags(bad) == []
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    assert server_names_for_dags(listy) == []


# --------------------------------------------------------------------- errors


def test_unset_variable_is_an_error_not_empty(raw):
    with pytest.raises(InventoryError) as ei:
        parse_inventory(raw, "lab.yaml", {"LAB_NET": "127.0.10"})
    assert "${LAB_DIR} is not set" in str(ei.value)
    # the error says where the variable was used
    assert "lab.yaml" in str(ei.value)


@pytest.mark.parametrize("doc", [None, [], {"version": 2}, {"servers": {}}, "version: 1"])
def test_version_required(doc):
    with pytest.raises(InventoryError, match="version: 1"):
        parse_inventory(doc, "x.yaml", ENV)


def test_no_servers(raw):
    raw["servers"] = {}
    with pytest.raises(InventoryError, match="no servers"):
        parse_inventory(raw, "x.yaml", ENV)


@pytest.mark.parametrize("bad_name", ["-leading-dash", "has space", "semi;colon", "a" * 64, "dollar$", "", "ünï"])
def test_bad_server_name(raw, bad_name):
    raw["servers"] = {bad_name: raw["servers"]["pg-primary"]}
    with pytest.raises(InventoryError, match="not a valid name"):
        parse_inventory(raw, "x.yaml", ENV)


def test_bad_host_names(raw):
    r = copy.deepcopy(raw)
    r["db_hosts"]["bad host"] = r["db_hosts"].pop("pg-nonprod")
    with pytest.raises(InventoryError, match=r"db_hosts\.bad host"):
        parse_inventory(r, "x.yaml", ENV)
    r = copy.deepcopy(raw)
    r["barman_hosts"]["barman-lab"]["ssh_conn_id"] = "conn;id"
    with pytest.raises(InventoryError, match="ssh_conn_id"):
        parse_inventory(r, "x.yaml", ENV)


def test_bad_validation_query_name(raw):
    raw["servers"]["pg-primary"]["validation_queries"]["bad name!"] = "SELECT 1"
    with pytest.raises(InventoryError, match="validation_queries"):
        parse_inventory(raw, "x.yaml", ENV)


@pytest.mark.parametrize(("where", "setter"), [
    ("data_directory", lambda r: r["servers"]["pg-primary"]["primary"].__setitem__("data_directory", "pg/data")),
    ("log_file", lambda r: r["servers"]["pg-primary"]["standbys"][0].__setitem__("log_file", "./x.log")),
    ("socket_directory", lambda r: r["servers"]["pg-primary"]["primary"].__setitem__("socket_directory", "run")),
    ("job_dir", lambda r: r["barman_hosts"]["barman-lab"].__setitem__("job_dir", "jobs")),
    ("pg_bin", lambda r: r["db_hosts"]["pg-primary"].__setitem__("pg_bin", "usr/lib/postgresql/15/bin")),
    ("backup_directory", lambda r: r["barman_hosts"]["barman-lab"].__setitem__("backup_directory", "~barman")),
])
def test_relative_paths_rejected(raw, where, setter):
    setter(raw)
    with pytest.raises(InventoryError, match=rf"{where}: .* must be an absolute path"):
        parse_inventory(raw, "x.yaml", ENV)


def test_path_with_newline_rejected(raw):
    raw["servers"]["pg-primary"]["primary"]["data_directory"] = "/pg/data\n/etc"
    with pytest.raises(InventoryError, match="absolute path"):
        parse_inventory(raw, "x.yaml", ENV)


def test_variable_expanding_to_relative_path_rejected(raw):
    with pytest.raises(InventoryError, match="absolute path"):
        parse_inventory(raw, "x.yaml", {"LAB_DIR": "relative/lab", "LAB_NET": "127.0.10"})


@pytest.mark.parametrize("value", ["/usr/bin/barman -c /etc/barman.conf", [], ["barman", ""], ["barman", 3]])
def test_barman_command_must_be_argv_list(raw, value):
    raw["barman_hosts"]["barman-lab"]["barman_command"] = value
    with pytest.raises(InventoryError, match="barman_command: must be a non-empty list of strings"):
        parse_inventory(raw, "x.yaml", ENV)


def test_restore_ssh_command_shell_string_rejected(raw):
    raw["db_hosts"]["pg-standby"]["restore_ssh_command"] = "ssh -F /x/config postgres@pg-standby"
    with pytest.raises(InventoryError, match=r"restore_ssh_command: .*argv, not a shell string"):
        parse_inventory(raw, "x.yaml", ENV)


def test_freeze_command_shell_string_rejected(raw):
    raw["servers"]["pg-primary"]["app_freeze"] = {"method": "command", "freeze_command": "systemctl stop app && true"}
    with pytest.raises(InventoryError, match="freeze_command"):
        parse_inventory(raw, "x.yaml", ENV)


def test_freeze_command_argv_accepted(raw):
    raw["servers"]["pg-primary"]["app_freeze"] = {"method": "command", "freeze_command": ["systemctl", "stop", "app"],
                                                  "unfreeze_command": ["systemctl", "start", "app"]}
    srv = parse_inventory(raw, "x.yaml", ENV).server("pg-primary")
    assert srv.app_freeze.freeze_command == ("systemctl", "stop", "app")


def test_unknown_freeze_method(raw):
    raw["servers"]["pg-primary"]["app_freeze"]["method"] = "haproxy"
    with pytest.raises(InventoryError, match=r"app_freeze\.method"):
        parse_inventory(raw, "x.yaml", ENV)


def test_missing_freeze_means_none(raw):
    del raw["servers"]["pg-primary"]["app_freeze"]
    assert parse_inventory(raw, "x.yaml", ENV).server("pg-primary").app_freeze.method == "none"


def test_unknown_barman_host(raw):
    raw["servers"]["pg-primary"]["barman_host"] = "barman-elsewhere"
    with pytest.raises(InventoryError, match="barman_host: 'barman-elsewhere' is not in barman_hosts"):
        parse_inventory(raw, "x.yaml", ENV)


def test_unknown_db_host(raw):
    raw["servers"]["pg-primary"]["standbys"][0]["host"] = "pg-elsewhere"
    with pytest.raises(InventoryError, match=r"standbys\[0\].host"):
        parse_inventory(raw, "x.yaml", ENV)


@pytest.mark.parametrize("port", [0, 70000, "5432", None, True])
def test_bad_port(raw, port):
    raw["servers"]["pg-primary"]["primary"]["port"] = port
    with pytest.raises(InventoryError, match="port"):
        parse_inventory(raw, "x.yaml", ENV)


def test_nonprod_optional(raw):
    del raw["servers"]["pg-primary"]["nonprod"]
    assert parse_inventory(raw, "x.yaml", ENV).server("pg-primary").nonprod is None


def test_lab_queues_and_workers(inv):
    """Each barman host names its queue; the workers declared serve every queue a task may need."""
    assert inv.queue_of("pg-primary") == "barman-lab"
    assert inv.queue_of("pg-primary2") == "barman-lab2"
    assert inv.queues == ["barman-lab", "barman-lab2", "default"]
    assert {n: w.queues for n, w in inv.workers.items()} == {
        "worker-a": ("default",), "worker-b": ("barman-lab",), "worker-c": ("barman-lab", "barman-lab2")}
    assert inv.barman_hosts["barman-lab2"].pool == "barman_barman_lab2"


def test_queue_defaults_to_default_without_workers(raw):
    for h in raw["barman_hosts"].values():
        h.pop("queue")
    raw.pop("workers")
    inv = parse_inventory(raw, "x.yaml", ENV)
    assert inv.queue_of("pg-primary") == "default" and inv.workers == {}


@pytest.mark.parametrize("value", ["bad queue", "", "q;rm -rf /", 7, "-lead"])
def test_bad_queue_name_names_the_field(raw, value):
    raw["barman_hosts"]["barman-lab"]["queue"] = value
    with pytest.raises(InventoryError, match=r"barman_hosts\.barman-lab\.queue: .*not a valid Celery queue name"):
        parse_inventory(raw, "x.yaml", ENV)


def test_the_routing_placeholder_is_not_a_queue(raw):
    from barman_dr.routing import SITE_QUEUE

    raw["barman_hosts"]["barman-lab"]["queue"] = SITE_QUEUE
    with pytest.raises(InventoryError, match="reserved by barman-dr"):
        parse_inventory(raw, "x.yaml", ENV)


def test_queue_no_worker_serves_is_refused(raw):
    raw["barman_hosts"]["barman-lab2"]["queue"] = "barman-lab3"
    with pytest.raises(InventoryError, match=r"barman_hosts\.barman-lab2\.queue: 'barman-lab3' is not served by any "
                                             r"worker \(served: barman-lab, barman-lab2, default\); fix the name"):
        parse_inventory(raw, "x.yaml", ENV)


@pytest.mark.parametrize(("workers", "match"), [
    ({"worker-a": {"queues": ["barman-lab", "barman-lab2"]}}, "no worker serves the `default` queue"),
    ({"worker-a": {"queues": []}}, r"workers\.worker-a\.queues: \[\] must be a non-empty list"),
    ({"worker-a": {"queues": ["default"], "concurrency": 0}}, r"workers\.worker-a\.concurrency: 0"),
    ({"bad name": {"queues": ["default"]}}, r"workers\.bad name"),
    ([], "workers: must be a mapping"),
])
def test_bad_workers_refused(raw, workers, match):
    raw["workers"] = workers
    with pytest.raises(InventoryError, match=match):
        parse_inventory(raw, "x.yaml", ENV)


# ------------------------------------------------------------------ delayed standbys (issue 17)
@pytest.mark.parametrize(("value", "seconds"), [(90, 90), ("30s", 30), ("5min", 300), ("5 minutes", 300),
                                                ("4h", 14400), ("1d", 86400), ("120", 120)])
def test_a_delayed_standby_takes_seconds_or_a_unit(raw, value, seconds):
    raw["servers"]["pg-primary"]["standbys"][0]["delayed"] = value
    sb = parse_inventory(raw, env=ENV).server("pg-primary").standbys[0]
    assert sb.delayed and sb.apply_delay_s == seconds
    assert sb.delay_tolerance_s == max(60, seconds // 10)


@pytest.mark.parametrize("value", ["soon", "-5min", "0", 0, True, "5 fortnights", "1.5h", [], "5min; rm -rf /"])
def test_a_bad_delay_names_the_field_and_the_fix(raw, value):
    raw["servers"]["pg-primary"]["standbys"][0]["delayed"] = value
    with pytest.raises(InventoryError, match=r"servers\.pg-primary\.standbys\[0\]\.delayed: .*Fix: seconds"):
        parse_inventory(raw, env=ENV)


def test_only_a_standby_can_be_delayed_and_tolerance_needs_a_delay(raw):
    bad = copy.deepcopy(raw)
    bad["servers"]["pg-primary"]["primary"]["delayed"] = "1h"
    with pytest.raises(InventoryError, match=r"primary\.delayed: only a standby"):
        parse_inventory(bad, env=ENV)
    bad = copy.deepcopy(raw)
    bad["servers"]["pg-primary"]["standbys"][0]["delay_tolerance"] = "1min"
    with pytest.raises(InventoryError, match=r"delay_tolerance: set only on a delayed standby"):
        parse_inventory(bad, env=ENV)
    raw["servers"]["pg-primary"]["standbys"][0].update(delayed="1h", delay_tolerance="15min")
    sb = parse_inventory(raw, env=ENV).server("pg-primary").standbys[0]
    assert (sb.apply_delay_s, sb.delay_tolerance_s) == (3600, 900)


def test_a_delay_postgresql_cannot_hold_and_a_backslash_in_restore_command_are_refused(raw):
    bad = copy.deepcopy(raw)
    bad["servers"]["pg-primary"]["standbys"][0]["delayed"] = "30d"
    with pytest.raises(InventoryError, match=r"delayed: '30d' is longer than .* Fix: a shorter interval"):
        parse_inventory(bad, env=ENV)
    bad = copy.deepcopy(raw)
    bad["servers"]["pg-primary"]["standbys"][0]["restore_command"] = "cp /a\\\\b/%f %p"
    with pytest.raises(InventoryError, match="no backslash"):
        parse_inventory(bad, env=ENV)
