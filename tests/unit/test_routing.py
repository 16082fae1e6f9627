"""The cluster policy that routes a run's site-bound tasks to its server's barman-host queue."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from barman_dr.routing import DEFAULT_QUEUE, SITE_QUEUE, queue_for_run, task_instance_mutation_hook, worker_hostname

LAB_YAML = Path(__file__).resolve().parents[2] / "include" / "inventory" / "lab.yaml"


@pytest.fixture(autouse=True)
def lab_env(monkeypatch):
    monkeypatch.setenv("LAB_DIR", "/var/tmp/lab-x")
    monkeypatch.setenv("LAB_NET", "127.0.77")
    monkeypatch.setenv("BARMAN_DR_INVENTORY", str(LAB_YAML))


def ti(queue: str = SITE_QUEUE) -> SimpleNamespace:
    return SimpleNamespace(queue=queue, task_id="stage_restore")


@pytest.mark.parametrize(("conf", "queue"), [
    ({"server": "pg-primary"}, "barman-lab"),
    ({"server": "pg-primary2"}, "barman-lab2"),
    ({}, "barman-lab"),              # the Param default: the first server
    (None, "barman-lab"),
    ({"server": " pg-primary2 "}, "barman-lab2"),  # stripped, as the request's validation reads it
    ({"server": "nope"}, DEFAULT_QUEUE),          # validate_params refuses it there; nothing site-bound runs
    ({"server": "pg-primary; rm -rf /"}, DEFAULT_QUEUE),
    ({"server": ["pg-primary"]}, DEFAULT_QUEUE),
])
def test_site_task_goes_to_its_servers_queue(conf, queue):
    t = ti()
    task_instance_mutation_hook(t, SimpleNamespace(conf=conf))
    assert t.queue == queue


def test_other_tasks_and_construction_are_left_alone():
    t = ti("default")
    task_instance_mutation_hook(t, SimpleNamespace(conf={"server": "pg-primary2"}))
    assert t.queue == "default"
    t = ti()
    task_instance_mutation_hook(t, None)  # TaskInstance() constructing: no run yet, the scheduler calls again
    assert t.queue == SITE_QUEUE


def test_broken_inventory_routes_to_default_and_never_raises(tmp_path, monkeypatch):
    bad = tmp_path / "inv.yaml"
    bad.write_text("version: 1\nservers: [\n")
    monkeypatch.setenv("BARMAN_DR_INVENTORY", str(bad))
    assert queue_for_run({"server": "pg-primary"}) == DEFAULT_QUEUE


def test_queue_follows_an_edited_inventory(tmp_path, monkeypatch):
    doc = yaml.safe_load(LAB_YAML.read_text())
    doc["barman_hosts"]["barman-lab"]["queue"] = "barman-lab2"
    p = tmp_path / "inv.yaml"
    p.write_text(yaml.safe_dump(doc))
    monkeypatch.setenv("BARMAN_DR_INVENTORY", str(p))
    assert queue_for_run({"server": "pg-primary"}) == "barman-lab2"


def test_worker_hostname(monkeypatch):
    monkeypatch.setenv("BARMAN_DR_WORKER_HOSTNAME", "worker-b")
    assert worker_hostname() == "worker-b"
    monkeypatch.delenv("BARMAN_DR_WORKER_HOSTNAME")
    assert worker_hostname()


def test_local_settings_exports_the_policy():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "plugins" / "airflow_local_settings.py"
    spec = importlib.util.spec_from_file_location("_als", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.task_instance_mutation_hook is task_instance_mutation_hook


def test_require_served_names_the_missing_queue_and_the_fix(monkeypatch):
    from barman_dr import routing

    monkeypatch.setattr(routing, "celery_enabled", lambda: True)
    monkeypatch.setattr(routing, "served_queues", lambda timeout=3.0: {"worker-a": ["default"],
                                                                      "worker-b": ["barman-lab"]})
    assert routing.require_served(["default", "barman-lab"]) == {"worker-a": ["default"], "worker-b": ["barman-lab"]}
    with pytest.raises(routing.QueueNotServedError, match=r"no live Celery worker serves queue\(s\) barman-lab2 .*"
                                                          r"worker-b: barman-lab.*airflow celery worker -q barman-lab2"):
        routing.require_served(["default", "barman-lab2"])


def test_require_served_is_inert_on_local_executor(monkeypatch):
    from barman_dr import routing

    monkeypatch.setattr(routing, "celery_enabled", lambda: False)
    monkeypatch.setattr(routing, "served_queues", lambda timeout=3.0: pytest.fail("must not broadcast"))
    assert routing.require_served(["barman-lab"]) == {}


def test_queue_not_served_is_a_preflight_refusal():
    from barman_dr.exceptions import PreflightError
    from barman_dr.routing import QueueNotServedError

    assert issubclass(QueueNotServedError, PreflightError)
