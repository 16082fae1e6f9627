"""Helpers of the scheduled-DAG integration tests: per-server XComs of mapped tasks, temp inventories."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml


def xcom_for(dag_id: str, run_id: str, task_id: str, server: str) -> Any:
    """`server`'s report from `task_id`'s return values: a mapped task's per-server value, or a per-host list."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(XComModel).filter_by(dag_id=dag_id, run_id=run_id, task_id=task_id,
                                                  key="return_value").all()
        values = [r.value for r in rows]
    for raw in values:
        v = json.loads(raw) if isinstance(raw, str) else raw
        for item in v if isinstance(v, list) else [v]:
            if isinstance(item, dict) and item.get("server") == server:
                return item
    return None


#: set by temp_inventory: conftest's `dags_back_to_the_lab_inventory` re-syncs the DAGs after the test
TEMP_INVENTORY_USED = {"used": False}


def resync_dags() -> None:
    """Parse the dags folder with the current environment and write every DAG to the metadata DB.

    After a test that ran DAGs parsed from an edited inventory, the next run (in-process or
    through the scheduler) must find the lab's own DAG shapes in the DB, not the edited ones.
    """
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db

    for bundle in DagBundlesManager().get_all_dag_bundles():
        if not bundle.is_initialized:
            bundle.initialize()
        bag = BundleDagBag(dag_folder=bundle.path, bundle_path=bundle.path, bundle_name=bundle.name)
        sync_bag_to_db(bag, bundle.name, bundle.version)


def temp_inventory(tmp_path: Path, monkeypatch: Any, edit: Any) -> Path:
    """A copy of the lab inventory changed by `edit(doc)`, made current through BARMAN_DR_INVENTORY.

    The operators read BARMAN_DR_INVENTORY when they run, the DAG files when they are parsed
    (run_dag parses them again for every run).
    """
    from barman_dr.inventory import inventory_path

    doc = yaml.safe_load(inventory_path().read_text())
    edit(doc)
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    monkeypatch.setenv("BARMAN_DR_INVENTORY", str(path))
    assert os.environ["BARMAN_DR_INVENTORY"] == str(path)
    TEMP_INVENTORY_USED["used"] = True
    return path
