"""The barman-dr Airflow plugin: registers the audit listener (the DR page comes later)."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from barman_dr import listeners


class BarmanDrPlugin(AirflowPlugin):
    name = "barman_dr"
    listeners = [listeners]
