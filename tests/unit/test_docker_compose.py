"""docker-compose.yaml, validated statically (no Docker engine here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yaml").read_text())


def requirement(name: str) -> str:
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if line.split("==")[0].strip() == name:
            return line.split("==")[1].strip()
    raise AssertionError(name)


def test_airflow_image_matches_requirements(compose):
    image = compose["x-airflow-common"]["image"]
    assert image.endswith(f"apache/airflow:{requirement('apache-airflow')}}}")


def test_celery_executor_with_redis_and_workers(compose):
    env = compose["x-airflow-common"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")
    for svc in ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                "airflow-init", "redis", "ops-db"):
        assert svc in compose["services"], svc


def test_workers_and_queues_come_from_the_inventory(compose, monkeypatch):
    """One worker service per inventory worker; its -q is read from the inventory at start (one layout)."""
    from barman_dr.fleet import main, queue_by_pool, worker_specs

    inv = REPO / "include" / "inventory" / "compose.yaml"
    specs = worker_specs(inv)
    assert specs == {"central": (["default"], 8), "barman": (["barman"], 4)}
    services = {k: v for k, v in compose["services"].items() if k.startswith("airflow-worker")}
    assert set(services) == {f"airflow-worker-{name}" for name in specs}
    for name in specs:
        svc = services[f"airflow-worker-{name}"]
        assert svc["environment"]["BARMAN_DR_WORKER"] == name
        assert svc["environment"]["PYTHONPATH"] == "/opt/airflow/plugins"
        assert svc["command"][:2] == ["bash", "-c"]
        cmd = svc["command"][2]
        assert 'q="$$(python -m barman_dr.fleet queues "$${BARMAN_DR_WORKER}")" && [ -n "$$q" ] || exit 1;' in cmd
        assert cmd.endswith('exec airflow celery worker -q "$$q"')
    served = {q for qs, _ in specs.values() for q in qs}
    assert set(queue_by_pool(inv).values()) <= served and "default" in served
    monkeypatch.setenv("BARMAN_DR_INVENTORY", str(inv))
    assert main(["queues", "barman"]) == 0 and main(["queues", "nobody"]) == 2 and main(["pools"]) == 0


def test_compose_inventory_parses_with_its_workers():
    import yaml as _yaml

    from barman_dr.inventory import parse_inventory

    inv = parse_inventory(_yaml.safe_load((REPO / "include" / "inventory" / "compose.yaml").read_text()), "compose")
    assert inv.queue_of("pg-primary") == "barman" and set(inv.workers) == {"central", "barman"}


def test_dr_fleet_is_there(compose):
    for svc in ("pg-primary", "pg-standby", "pgbouncer", "barman"):
        assert svc in compose["services"], svc


def test_barman_version_matches_the_lab(compose):
    lab = re.search(r'BARMAN_VERSION="([^"]+)"', (REPO / "include/lab/install.sh").read_text()).group(1)
    assert compose["services"]["barman"]["build"]["args"]["BARMAN_VERSION"] == lab
    assert f"ARG BARMAN_VERSION={lab}" in (REPO / "deploy/barman/Dockerfile").read_text()


def test_every_dependency_is_a_service(compose):
    services = compose["services"]
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        for dep in deps if isinstance(deps, (list, dict)) else []:
            assert dep in services, f"{name} depends on unknown service {dep}"


def test_every_bind_mount_and_build_context_exists(compose):
    mounts = list(compose["x-airflow-common"].get("volumes", []))
    for svc in compose["services"].values():
        mounts += svc.get("volumes", []) or []
        build = svc.get("build")
        if build:
            context = build if isinstance(build, str) else build["context"]
            assert (REPO / context / "Dockerfile").exists(), context
    named = set(compose.get("volumes") or {})
    for m in mounts:
        host = m.split(":")[0]
        if host.startswith("."):
            assert (REPO / host).exists(), f"mounted path {host} missing from the repo"
        else:
            assert host in named, f"volume {host} is not declared"


def test_compose_inventory_is_valid():
    from barman_dr.inventory import parse_inventory

    inv = parse_inventory(yaml.safe_load((REPO / "include/inventory/compose.yaml").read_text()), "compose.yaml", {})
    assert inv.server_names == ["pg-primary"]
    assert inv.barman_host_of("pg-primary").pool == "barman_barman"
