"""The barman-dr Airflow plugin: the audit listener, and the DR page in the API server and the UI nav."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from barman_dr import listeners


def _dr_page() -> object:
    from barman_dr.surfaces.web import create_app

    return create_app()


class BarmanDrPlugin(AirflowPlugin):
    name = "barman_dr"
    listeners = [listeners]
    fastapi_apps = [{"app": _dr_page(), "url_prefix": "/barman-dr", "name": "barman-dr DR page"}]
    external_views = [{"name": "Disaster recovery", "href": "/barman-dr/", "destination": "nav",
                       "category": "browse", "url_route": "barman-dr"}]
