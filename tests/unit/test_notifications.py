"""The chat-webhook payload of DrNotifier: server, what failed, what to do next."""

from __future__ import annotations

from barman_dr.surfaces.notifications import webhook_payload

DETAILS = {"server": "pg-primary", "error": "PitrRequestError: target_time ... NEXT: fix it",
           "next_action": "fix it", "map_index": -1, "message": "m"}


def test_slack_payload_has_the_three_facts():
    body = webhook_payload("dr_pitr r1: task validate_params failed", DETAILS, channel="#dr")
    assert set(body) == {"text", "channel"}
    assert "`pg-primary`" in body["text"] and "validate_params" in body["text"]
    assert "*What failed:* PitrRequestError" in body["text"] and "*Next:* fix it" in body["text"]


def test_unknown_server_and_no_channel():
    body = webhook_payload("x", {"server": None})
    assert body == {"text": ":rotating_light: *barman-dr* `?`: x"}


def test_json_format_passes_the_details_for_incident_tooling():
    body = webhook_payload("x", DETAILS, fmt="json")
    assert body["source"] == "barman-dr" and body["server"] == "pg-primary" and body["next_action"] == "fix it"


def test_long_errors_are_cut():
    body = webhook_payload("x", {"server": "s", "error": "e" * 5000})
    assert len(body["text"]) < 1700


def test_the_shared_notifier_renders_each_failure_afresh(monkeypatch):
    from types import SimpleNamespace

    from barman_dr.surfaces.notifications import DrNotifier

    sent: list[str] = []
    n = DrNotifier(message="task {{ ti.task_id }} failed")
    monkeypatch.setattr(DrNotifier, "notify", lambda self, ctx: sent.append(self.message))
    for task_id in ("validate_params", "failure_summary"):
        n({"ti": SimpleNamespace(task_id=task_id), "dag": None})
    assert sent == ["task validate_params failed", "task failure_summary failed"]
