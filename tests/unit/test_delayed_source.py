"""The delayed-standby source of dr_pitr (issue 17): the request, the decision, the recovery target, the rebuilds."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from barman_dr.exceptions import InventoryError, PreflightError, ValidationError
from barman_dr.inventory import parse_inventory, standby_names_for_dags
from barman_dr.operators.pitr.delayed import choose_source
from barman_dr.operators.pitr.delayed_source import TARGET_KEYS, recovery_target_settings
from barman_dr.operators.pitr.post_incident import SET_CONF_SCRIPT, standbys_to_rebuild
from barman_dr.params.pitr_request import validate_pitr_conf

LAB_YAML = Path(__file__).resolve().parents[2] / "include" / "inventory" / "lab.yaml"
ENV = {"LAB_DIR": "/var/tmp/lab-x", "LAB_NET": "127.0.77"}
NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
STOP = {"lsn": "0/6F0011E0", "end_lsn": "0/6F001208", "when": "before", "timeline": 7}
BEFORE = {"standby": "pg-delayed", "paused": True, "replay_lsn": "0/6E000100", "timeline": 7, "in_recovery": True}
PAST = {**BEFORE, "replay_lsn": "0/70000000"}


@pytest.fixture
def raw() -> dict:
    return yaml.safe_load(LAB_YAML.read_text())


@pytest.fixture
def inv(raw):
    return parse_inventory(raw, str(LAB_YAML), ENV)


def conf(**kw):
    return {"server": "pg-primary", "target_xid": "1234", "target_inclusive": False, **kw}


# ------------------------------------------------------------------ inventory
def test_the_spare_is_a_delayed_standby_that_does_not_run_day_to_day(inv):
    srv = inv.server("pg-primary")
    assert [s.name for s in srv.standbys] == ["pg-standby", "pg-delayed", "pg-delayed2"]
    assert [s.name for s in srv.active_standbys] == ["pg-standby", "pg-delayed"]
    assert [s.name for s in srv.delayed_standbys] == ["pg-delayed"]
    assert srv.standby("pg-delayed2").spare and srv.standby("pg-delayed2").apply_delay_s == 180
    assert "pg-delayed2" not in standby_names_for_dags(LAB_YAML)  # never a restore_to choice


def test_only_a_delayed_standby_can_be_a_spare(raw):
    sb = raw["servers"]["pg-primary"]["standbys"][0]
    sb["spare"] = True
    with pytest.raises(InventoryError, match=r"standbys\[0\]\.spare: only a delayed standby"):
        parse_inventory(raw, "x", ENV)
    sb["spare"] = "yes"
    with pytest.raises(InventoryError, match="must be true or false"):
        parse_inventory(raw, "x", ENV)


# -------------------------------------------------------------------- request
def test_source_is_barman_unless_asked_and_typed(inv):
    assert validate_pitr_conf(conf(), inv, now=NOW).source == "barman"
    for source in ("auto", "delayed_standby"):
        req = validate_pitr_conf(conf(source=source), inv, now=NOW)
        assert req.source == source and req.source_chosen is None and not req.from_delayed_standby
    with pytest.raises(ValidationError, match=r"source.*use one of barman, auto, delayed_standby"):
        validate_pitr_conf(conf(source="standby; rm -rf /"), inv, now=NOW)
    with pytest.raises(ValidationError, match="source"):
        validate_pitr_conf(conf(source=["auto"]), inv, now=NOW)


def test_a_delayed_source_needs_a_delayed_standby_and_restores_onto_it(inv):
    with pytest.raises(ValidationError, match="pg-primary2 has no delayed standby"):
        validate_pitr_conf(conf(server="pg-primary2", source="auto"), inv, now=NOW)
    with pytest.raises(ValidationError, match=r"restore_to.*the recovered server is the delayed standby"):
        validate_pitr_conf(conf(source="delayed_standby", restore_to="pg-standby"), inv, now=NOW)
    # auto may only fall back to Barman there: accepted (choose_source says why)
    assert validate_pitr_conf(conf(source="auto", restore_to="pg-standby"), inv, now=NOW).source == "auto"
    with pytest.raises(ValidationError, match=r"backup_id.*copies no backup"):
        validate_pitr_conf(conf(source="delayed_standby", backup_id="20261125T020000"), inv, now=NOW)
    assert validate_pitr_conf(conf(source="delayed_standby", restore_to="pg-delayed"), inv, now=NOW).restore_to \
        == "pg-delayed"
    with pytest.raises(ValidationError, match="spare"):
        validate_pitr_conf(conf(restore_to="pg-delayed2"), inv, now=NOW)
    immediate = {"server": "pg-primary", "target_immediate": True}
    with pytest.raises(ValidationError, match="end of a base backup"):
        validate_pitr_conf({**immediate, "source": "delayed_standby"}, inv, now=NOW)
    assert validate_pitr_conf({**immediate, "source": "auto"}, inv, now=NOW).source == "auto"


# ------------------------------------------------------------------- decision
def test_the_decision_follows_where_the_delayed_standby_stands(inv):
    srv = inv.server("pg-primary")
    req = validate_pitr_conf(conf(source="auto"), inv, now=NOW)
    d = choose_source(req, srv, STOP, [BEFORE])
    assert d["chosen"] == "delayed_standby" and d["restore_to"] == "pg-delayed" and "before the stop point" in d["why"]
    d = choose_source(req, srv, STOP, [PAST])
    assert d["chosen"] == "barman" and d["restore_to"] == "in_place"
    assert "falling back to Barman (staged restore)" in d["why"] and "older than its window" in d["why"]
    unstaged = validate_pitr_conf(conf(source="auto", staged_restore=False), inv, now=NOW)
    assert "(unstaged restore)" in choose_source(unstaged, srv, STOP, [PAST])["why"]
    assert choose_source(req, srv, STOP, [])["chosen"] == "barman"  # not paused: never trusted
    strict = validate_pitr_conf(conf(source="delayed_standby"), inv, now=NOW)
    assert choose_source(strict, srv, STOP, [BEFORE])["chosen"] == "delayed_standby"
    with pytest.raises(PreflightError, match=r"no delayed standby of pg-primary can serve.*source=auto"):
        choose_source(strict, srv, STOP, [PAST])
    onto = validate_pitr_conf(conf(source="auto", restore_to="pg-standby"), inv, now=NOW)
    d = choose_source(onto, srv, STOP, [BEFORE])
    assert d["chosen"] == "barman" and d["restore_to"] == "pg-standby" and "not a delayed standby" in d["why"]
    plain = validate_pitr_conf(conf(), inv, now=NOW)
    assert choose_source(plain, srv, STOP, [BEFORE]) == {
        "chosen": "barman", "restore_to": "in_place", "standby": None, "requested": "barman",
        "why": "source=barman: restore a Barman backup and replay its WAL"}


def test_every_later_step_reads_the_request_through_the_decision():
    from barman_dr.operators.pitr import StopPostgresOperator

    op = StopPostgresOperator(task_id="stop_postgres")
    pushed = {"chosen": "delayed_standby", "restore_to": "pg-delayed"}
    ctx = {"dag": SimpleNamespace(task_ids=["validate_params", "resolve_target", "stop_postgres"]),
           "ti": SimpleNamespace(xcom_pull=lambda task_ids, key="return_value": pushed if key == "source" else None)}
    req = {"source": "auto", "restore_to": "in_place"}
    assert op.effective_request(ctx, req) == {"source": "auto", "restore_to": "pg-delayed",
                                              "source_chosen": "delayed_standby"}
    assert op.effective_request(ctx, {"source": "barman", "restore_to": "in_place"})["restore_to"] == "in_place"
    pushed = None  # resolve_target never decided (it failed): the request as validated
    assert op.effective_request(ctx, req) == req


def test_a_delayed_standby_the_run_could_not_finish_on_is_never_chosen(raw):
    """No restore_command (timeline ids, WAL the primary lost), or an app that cannot be pointed at it."""
    srv_raw = raw["servers"]["pg-primary"]
    del srv_raw["standbys"][1]["restore_command"]
    inv = parse_inventory(raw, "x", ENV)
    req = validate_pitr_conf(conf(source="auto"), inv, now=NOW)
    d = choose_source(req, inv.server("pg-primary"), STOP, [BEFORE])
    assert d["chosen"] == "barman" and "no restore_command" in d["why"]
    raw2 = yaml.safe_load(LAB_YAML.read_text())
    raw2["servers"]["pg-primary"]["app_freeze"] = {"method": "command", "freeze_command": ["true"],
                                                   "unfreeze_command": ["true"]}
    inv2 = parse_inventory(raw2, "x", ENV)
    with pytest.raises(ValidationError, match="cannot be pointed at the promoted standby"):
        validate_pitr_conf(conf(source="delayed_standby"), inv2, now=NOW)
    d = choose_source(validate_pitr_conf(conf(source="auto"), inv2, now=NOW), inv2.server("pg-primary"), STOP,
                      [BEFORE])
    assert d["chosen"] == "barman" and "could not be pointed at the promoted standby" in d["why"]


# ------------------------------------------------------------- recovery target
def test_the_recovery_target_is_the_resolved_stop_point_on_its_timeline_with_no_delay(tmp_path):
    res = {"restore_target": {"kind": "xid", "value": "2000123", "inclusive": False}, "recovery_timeline": 7}
    lines = recovery_target_settings(res)
    assert lines[len(TARGET_KEYS) - 1:] == ["recovery_target_xid = '2000123'", "recovery_target_inclusive = 'off'",
                                            "recovery_target_timeline = '7'", "recovery_target_action = 'promote'",
                                            "recovery_min_apply_delay = '0'"]
    assert "recovery_target_lsn = ''" in lines and "recovery_target_time = ''" in lines
    t = recovery_target_settings({"restore_target": {"kind": "time", "value": "2026-12-05T01:02:03+00:00",
                                                     "inclusive": True}, "recovery_timeline": 3})
    assert "recovery_target_time = '2026-12-05T01:02:03+00:00'" in t and "recovery_target_inclusive = 'on'" in t
    with pytest.raises(PreflightError, match="immediate"):
        recovery_target_settings({"restore_target": {"kind": "immediate", "value": None, "inclusive": True},
                                  "recovery_timeline": 1})
    # written over a delayed standby's file: its delay and any earlier target replaced, a retry writes the same file
    auto = tmp_path / "postgresql.auto.conf"
    auto.write_text("primary_conninfo = 'host=x'\nrecovery_min_apply_delay = '180s'\nrecovery_target_lsn = '0/1'\n")
    for _ in range(2):
        subprocess.run(["sh", "-c", SET_CONF_SCRIPT, "sh", str(auto), *lines], check=True)
    text = auto.read_text().splitlines()
    assert text[0] == "primary_conninfo = 'host=x'" and text.count("recovery_min_apply_delay = '0'") == 1
    assert "recovery_min_apply_delay = '180s'" not in text and "recovery_target_lsn = ''" in text


# -------------------------------------------------------------------- rebuilds
def test_the_spare_is_built_only_when_a_delayed_standby_became_the_server(inv):
    srv = inv.server("pg-primary")
    assert standbys_to_rebuild(srv, srv.standby("pg-delayed")) == ["pg-standby", "pg-delayed2"]
    assert standbys_to_rebuild(srv, srv.primary) == ["pg-standby", "pg-delayed"]
    assert standbys_to_rebuild(srv, srv.standby("pg-standby")) == ["pg-delayed"]


# ------------------------------------------------------- retry-safe promotion
class _Db:
    """A delayed standby as the promotion sees it: its state, and every command in order."""

    def __init__(self, status="running", in_recovery=True, ours=False):
        self.state, self.recovering, self.ours, self.calls = status, in_recovery, ours, []
        self.host = SimpleNamespace(run=lambda argv, **kw: self.calls.append(("run", argv[2] if len(argv) > 2 else "")))

    def status(self, _d):
        return self.state

    def in_recovery(self, _i):
        return self.recovering

    def psql(self, _i, sql, **_kw):
        if "recovery_target_action" in sql:
            return "promote|0" if self.ours else "pause|3min"
        # STATE_SQL: paused before the stop point (while it is a standby)
        return ("t|t" if self.recovering else "f|") + "|0/6E000100|2026-12-05 00:00:00+00|7"

    def log_size(self, _f):
        return 4242

    def is_ready(self, _i):
        return True

    def wait_ready(self, _i, timeout=0):
        return 0.1

    def stop(self, _i, mode="fast"):
        self.calls.append(("stop", mode))
        self.state = "stopped"

    def start(self, _i, wait=False, options=None):
        self.calls.append(("start", options))
        self.state, self.recovering = "running", False


    def wait_recovery_end(self, _i, timeout=0):
        return 0.2


def _promotion(monkeypatch, inv, db, events):
    from barman_dr.operators.pitr import delayed_source

    monkeypatch.setattr(delayed_source, "prove_on", lambda *a: {"reached": True, "reasons": [], "new_timeline": 8,
                                                                "switch_lsn": "0/6F0011E0", "stop_lines": []})
    monkeypatch.setattr(delayed_source, "validate_counts", lambda *a: {"actual": {}, "expected": {}})
    srv = inv.server("pg-primary")
    recorded = []
    audit = SimpleNamespace(events=lambda **kw: list(events),
                            record=lambda action, outcome, **kw: recorded.append((action, outcome, kw["details"])))
    res = {"stop": {**STOP, "described": "before commit"},
           "restore_target": {"kind": "xid", "value": "2000123", "inclusive": False},
           "recovery_timeline": 7}
    listing = "00000006.history\n00000007.history\n00000008.history\n0000000800000000\n"
    barman = SimpleNamespace(show_server=lambda name: {"wals_directory": "/b/wals"}, host=SimpleNamespace(
        run=lambda argv, **kw: SimpleNamespace(stdout=listing if argv[0] == "ls" else "7\t0/6F0011E0\tbefore\n")))
    op = SimpleNamespace(target_instance=srv.standby("pg-delayed"), req=SimpleNamespace(expected={}), srv=srv,
                         db=lambda host: db, audit=lambda ctx: audit, upstream=lambda ctx, t: res, barman=barman)
    ctx = {"run_id": "r", "dag": SimpleNamespace(dag_id="dr_pitr")}
    return delayed_source.recover_on_delayed_standby(op, ctx), recorded


def test_the_promotion_audits_its_intent_and_writes_the_stop_point_before_the_stop(monkeypatch, inv):
    db = _Db()
    out, recorded = _promotion(monkeypatch, inv, db, [])
    assert [r[:2] for r in recorded] == [("delayed_source", "started")] and recorded[0][2]["log_offset"] == 4242
    kinds = [c[0] for c in db.calls]
    # stopped, the target written, Barman's history of its timeline and the later one (7, 8) copied, started
    assert kinds == ["stop", "run", "run", "run", "start"]
    assert "listen_addresses=" in db.calls[-1][1] and "archive_command=false" in db.calls[-1][1]
    assert "restore_command=" in db.calls[-1][1]  # the primary is up: no per-segment trip to the archive
    assert out["log_offset"] == 4242 and out["source"] == "delayed_standby"


def test_a_retry_picks_up_from_the_audited_intent(monkeypatch, inv):
    intent = [{"outcome": "started", "target": "pg-delayed", "details": {"log_offset": 17, "replay_lsn": "0/6E000100"}}]
    db = _Db(status="stopped")  # the first try died after the stop: the pause is gone, the stop point written
    out, recorded = _promotion(monkeypatch, inv, db, intent)
    assert recorded == [] and [c[0] for c in db.calls] == ["run", "run", "run", "start"] and out["log_offset"] == 17
    db = _Db(ours=True)  # died while it replayed to this run's target: only waits, proves
    out, _ = _promotion(monkeypatch, inv, db, intent)
    assert db.calls == [] and out["log_offset"] == 17
    db = _Db(in_recovery=False)  # died after the promotion: proven again
    assert _promotion(monkeypatch, inv, db, intent)[0]["reached"] and db.calls == []


def test_a_standby_this_run_never_touched_is_refused_unless_paused_before_the_stop(monkeypatch, inv):
    with pytest.raises(PreflightError, match="not running"):
        _promotion(monkeypatch, inv, _Db(status="stopped"), [])  # stopped by someone else: its position unknown
    with pytest.raises(PreflightError, match="can no longer serve"):
        _promotion(monkeypatch, inv, _Db(in_recovery=False), [])  # promoted by someone else


def test_restore_to_a_standby_is_refused_before_anything_when_the_app_could_not_follow(raw):
    """The server would move and the app stay on the fenced primary: refused at validation, naming the fix."""
    from barman_dr.operators.pitr.plan import unfreeze_step

    fr = raw["servers"]["pg-primary"]["app_freeze"]
    for broken, says in (({"method": "command", "freeze_command": ["true"], "unfreeze_command": ["true"]},
                          "method command cannot point the app"),
                         ({**{k: v for k, v in fr.items() if k not in ("config_file", "config_host")}},
                          "no config_file/config_host")):
        raw["servers"]["pg-primary"]["app_freeze"] = broken
        inv = parse_inventory(raw, "x", ENV)
        with pytest.raises(ValidationError, match=says) as err:
            validate_pitr_conf(conf(restore_to="pg-standby"), inv, now=NOW)
        assert err.value.field == "restore_to" and "restore in_place" in str(err.value)
        assert validate_pitr_conf(conf(), inv, now=NOW).in_place  # in place is still accepted
    # nothing manages the app: accepted, and the plan says where the DBA must point it
    raw["servers"]["pg-primary"]["app_freeze"] = {"method": "none"}
    inv = parse_inventory(raw, "x", ENV)
    req = validate_pitr_conf(conf(restore_to="pg-standby"), inv, now=NOW)
    srv = inv.server("pg-primary")
    sb = next(s for s in srv.standbys if s.name == "pg-standby")
    line = unfreeze_step(srv, req.in_place, sb, inv)
    assert "point it at pg-standby (127.0.77.12:5432) yourself" in line and "pg-primary is fenced" in line
    assert unfreeze_step(srv, True, srv.primary, inv) == "unfreeze app"
